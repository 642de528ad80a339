import type { BackingDevice } from '../backing/backing.js';
import {
  CACHE_MODES,
  flagsDataCrc,
  flagsGcPercent,
  flagsInitDone,
  flagsMode,
  FormatError,
  GC_PERCENT_DEFAULT,
  GC_PERCENT_MAX,
  withGcPercent,
  type CacheMode,
  type Position,
} from '../format/index.js';
import { silentLogger, type Logger } from '../log.js';
import type { Medium } from '../media/medium.js';
import type { BlockDevice } from './block-device.js';
import { newCounters, type CacheCore, type Counters } from './core.js';
import { DataHead } from './data-head.js';
import { DataWriter } from './data-writer.js';
import { CacheError } from './errors.js';
import { FailureLog } from './failures.js';
import { FillGate, SEQUENTIAL_CUTOFF_DEFAULT } from './fill.js';
import { formatCache } from './format.js';
import { Gc } from './gc.js';
import { KsetLog } from './kset-log.js';
import { isBlank, loadMeta, type CacheMeta } from './meta.js';
import { cacheInfoRecord, dirtyTailRecord, keyTailRecord, type TwoSlotRecord } from './persist.js';
import { isStale, readData } from './read.js';
import { replay } from './replay.js';
import type { CacheStatus } from './status.js';
import { writeData, Zeroer } from './write.js';
import { Writeback } from './writeback.js';

export interface CacheOptions {
  /** dm-pcache's data_crc; must match what the cache was formatted with. Default: as persisted (false when formatting). */
  dataCrc?: boolean;
  /** dm-pcache's cache_mode; only writeback is implemented. */
  cacheMode?: CacheMode;
  /** Used when the device is formatted on first open. */
  gcPercent?: number;
  /** Write-back looks for work this often when not kicked (dm-pcache: 5 s). */
  writebackIntervalMs?: number;
  /** GC looks for work this often when not kicked (dm-pcache: 5 s). */
  gcIntervalMs?: number;
  /** An open kset is closed this long after its first key (dm-pcache: about 1 s). */
  ksetCloseMs?: number;
  /** Format an unformatted device on open (as dm-pcache does). Default true. */
  formatIfBlank?: boolean;
  /**
   * How often segments a write found without blocks (a sparse cache file on a full filesystem)
   * are tried again (default 5 s): the filesystem may have room by then.
   */
  spaceRetryMs?: number;
  /** Where write-back, GC and space failures are logged (default: nowhere). */
  logger?: Logger;
  /** Read streams longer than this many bytes are not filled into the cache; 0: no cutoff. Default 4 MiB. */
  sequentialCutoff?: number;
}

function validCutoff(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

function checkOptions(meta: CacheMeta, opts: CacheOptions): void {
  const persistedCrc = flagsDataCrc(meta.cacheInfo.flags);
  if (opts.dataCrc !== undefined && opts.dataCrc !== persistedCrc) {
    throw new CacheError(`invalid option for data_crc: ${opts.dataCrc}, expected: ${persistedCrc}`);
  }
  const persistedMode = flagsMode(meta.cacheInfo.flags);
  if (opts.cacheMode !== undefined && opts.cacheMode !== persistedMode) {
    throw new CacheError(`invalid option for cache_mode: ${opts.cacheMode}, expected: ${persistedMode}`);
  }
  if (persistedMode !== 'writeback') throw new CacheError(`cache mode ${persistedMode} is not supported (only writeback)`);
}

/**
 * pcache: a block device over a cache device and a backing device, in dm-pcache's format.
 * open() formats a blank device, loads the metadata, replays the log, and starts write-back.
 */
export class Cache implements BlockDevice {
  private readonly core: CacheCore;
  private readonly zeroer: Zeroer;
  /** Requests and background fills not yet settled, and who waits for there to be none. */
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private closed = false;
  private sweepPending = false;
  private cacheFlags: number;
  private spaceTimer: NodeJS.Timeout | undefined;
  private failures: FailureLog = new FailureLog(silentLogger);

  private constructor(
    readonly medium: Medium,
    readonly backing: BackingDevice,
    private readonly meta: CacheMeta,
    core: CacheCore,
    private readonly gc: Gc,
    private readonly writeback: Writeback,
    private readonly cacheInfo: TwoSlotRecord<{ segId: number; nSegs: number; flags: number }>,
    readonly replayNote: string | null,
  ) {
    this.core = core;
    this.zeroer = new Zeroer(core);
    this.cacheFlags = meta.cacheInfo.flags;
  }

  static async open(medium: Medium, backing: BackingDevice, opts: CacheOptions = {}): Promise<Cache> {
    if (opts.cacheMode !== undefined && !CACHE_MODES.includes(opts.cacheMode)) throw new CacheError(`Invalid cache mode parameter`);
    if (opts.gcPercent !== undefined && (!Number.isInteger(opts.gcPercent) || opts.gcPercent < 0 || opts.gcPercent > GC_PERCENT_MAX)) {
      throw new CacheError(`gc_percent must be within 0..${GC_PERCENT_MAX}`);
    }
    if (opts.sequentialCutoff !== undefined && !validCutoff(opts.sequentialCutoff)) throw new CacheError('sequential_cutoff must be a whole number of bytes >= 0');
    if ((opts.formatIfBlank ?? true) && (await isBlank(medium))) {
      const f = await formatCache(medium, { dataCrc: opts.dataCrc ?? false, mode: opts.cacheMode ?? 'writeback', gcPercent: opts.gcPercent ?? GC_PERCENT_DEFAULT });
      if (f instanceof FormatError) throw new CacheError(f.message);
    }
    let meta = await loadMeta(medium);
    if (meta instanceof FormatError) throw new CacheError(`${medium.path}: ${meta.message}`, 'EIO');
    if (!flagsInitDone(meta.cacheInfo.flags)) {
      // dm-pcache treats a cache whose first start never finished as fresh.
      const f = await formatCache(medium, { dataCrc: opts.dataCrc ?? flagsDataCrc(meta.cacheInfo.flags), mode: 'writeback', gcPercent: flagsGcPercent(meta.cacheInfo.flags) });
      if (f instanceof FormatError) throw new CacheError(f.message);
      meta = await loadMeta(medium);
      if (meta instanceof FormatError) throw new CacheError(`${medium.path}: ${meta.message}`, 'EIO');
    }
    checkOptions(meta, opts);
    const dataCrc = flagsDataCrc(meta.cacheInfo.flags);
    const backingSize = backing.size();
    const r = await replay(medium, meta, backingSize, dataCrc);

    const stats: Counters = newCounters();
    stats.dirtyBytes = r.dirtyBytes;
    let cache: Cache | undefined;
    const log = new KsetLog(medium, meta.physOf, r.segments, r.keyHead, opts.ksetCloseMs ?? 1000, {
      written: () => cache?.writeback.kick(),
      needSpace: () => cache?.needSpace(),
      error: () => undefined,
    });
    const core: CacheCore = {
      medium,
      backing,
      physOf: meta.physOf,
      dataCrc,
      backingSize,
      segments: r.segments,
      index: r.index,
      log,
      head: new DataHead(r.segments),
      data: new DataWriter(medium),
      stats,
      fills: new FillGate(opts.sequentialCutoff ?? SEQUENTIAL_CUTOFF_DEFAULT),
      needSpace: () => cache?.needSpace(),
      track: (p) => cache?.track(p),
    };
    const writeback = new Writeback(core, { seg: meta.dirtyTail.seg, off: meta.dirtyTail.off }, dirtyTailRecord(medium, meta.dirtyTailSlot), opts.writebackIntervalMs ?? 5000, () =>
      cache?.gc.kick(),
    );
    const gc = new Gc(core, { seg: meta.keyTail.seg, off: meta.keyTail.off }, keyTailRecord(medium, meta.keyTailSlot), () => writeback.dirtyTail, flagsGcPercent(meta.cacheInfo.flags), opts.gcIntervalMs);
    cache = new Cache(medium, backing, meta, core, gc, writeback, cacheInfoRecord(medium, meta.cacheInfoSlot), r.endNote);
    const logger = opts.logger ?? silentLogger;
    const failures = new FailureLog(logger);
    cache.failures = failures;
    writeback.onError = (err, pos) => failures.record('writeback', 'dirty_tail', err, pos);
    gc.onError = (err, pos) => failures.record('gc', 'key_tail', err, pos);
    r.segments.onError = (err) => logger.limited('error', 'segment_gen', 10_000, 'segment_gen_error', `segment generation update failed: ${err instanceof Error ? err.message : String(err)}`);
    r.segments.onNoBlocks = (seg) =>
      logger.limited('warn', 'no_space', 10_000, 'cache_no_space', 'a cache device write failed for space (a sparse cache file on a full filesystem?): going on in other segments', {
        seg,
        path: medium.path,
      });
    r.segments.onFree = () => stats.segmentsFreed++;
    r.segments.onInvalidate = () => cache?.scheduleSweep();
    writeback.start();
    writeback.kick();
    gc.start();
    cache.spaceTimer = setInterval(() => r.segments.retrySpace(), opts.spaceRetryMs ?? 5000);
    cache.spaceTimer.unref();
    return cache;
  }

  size(): number {
    return this.core.backingSize;
  }

  private needSpace(): void {
    this.core.segments.retryFailedBumps();
    this.core.log.close().catch(() => undefined);
    this.writeback.kick();
    this.gc.kick();
  }

  /** One counter and one reaction per request: this is on every request's path. */
  private track(p: Promise<unknown>): void {
    this.inFlight++;
    const settled = (): void => {
      if (--this.inFlight > 0) return;
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    };
    p.then(settled, settled);
  }

  /** Resolves once nothing tracked is in flight (work tracked meanwhile included). */
  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Drop stale keys from the index in the background, once per burst of invalidations. */
  private scheduleSweep(): void {
    if (this.sweepPending) return;
    this.sweepPending = true;
    setImmediate(() => {
      this.sweepPending = false;
      this.core.stats.staleKeysDropped += this.core.index.sweep((k) => isStale(this.core, k));
    });
  }

  private checkRange(off: number, len: number): void {
    if (this.closed) throw new CacheError('cache is closed', 'ESHUTDOWN');
    if (!Number.isSafeInteger(off) || !Number.isSafeInteger(len) || off < 0 || len < 0 || off + len > this.core.backingSize) {
      throw new CacheError(`request ${off}+${len} is outside the device (${this.core.backingSize} bytes)`, 'EINVAL');
    }
  }

  private run<T>(p: Promise<T>): Promise<T> {
    this.track(p);
    return p;
  }

  read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    this.core.stats.reads++;
    this.core.stats.readBytes += length;
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    return this.run(readData(this.core, offset, length));
  }

  write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    this.core.stats.writes++;
    this.core.stats.writeBytes += data.length;
    if (!opts.fua) return this.run(writeData(this.core, offset, data));
    this.core.stats.fuaWrites++;
    return this.run(writeData(this.core, offset, data).then(() => this.persistLog()));
  }

  writeZeroes(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    this.core.stats.zeroWrites++;
    this.core.stats.zeroBytes += length;
    return this.run(
      (async () => {
        await this.zeroer.zero(offset, length);
        if (opts.fua) await this.persistLog();
      })(),
    );
  }

  /** Every write acknowledged before this call is durable when it resolves. */
  flush(): Promise<void> {
    if (this.closed) return Promise.reject(new CacheError('cache is closed', 'ESHUTDOWN'));
    this.core.stats.flushes++;
    return this.run(this.persistLog());
  }

  private async persistLog(): Promise<void> {
    await this.core.log.close();
    // Through the log, which notes the ksets this sync made durable: write-back need not sync again for them.
    await this.core.log.sync();
  }

  setGcPercent(n: number): Promise<void> {
    if (!Number.isInteger(n) || n < 0 || n > GC_PERCENT_MAX) return Promise.reject(new CacheError('Invalid argument', 'EINVAL'));
    const flags = withGcPercent(this.cacheFlags, n);
    return this.cacheInfo.store({ segId: this.meta.cacheInfo.segId, nSegs: this.meta.cacheInfo.nSegs, flags }).then(() => {
      this.cacheFlags = flags;
      this.gc.gcPercent = n;
      this.gc.kick();
    });
  }

  /** A pcache extension (bcache's sequential_cutoff), not persisted: read streams past n bytes are not filled. */
  setSequentialCutoff(n: number): void {
    if (!validCutoff(n)) throw new CacheError('Invalid argument', 'EINVAL');
    this.core.fills.sequentialCutoff = n;
  }

  get dirtyTail(): Position {
    return this.writeback.dirtyTail;
  }
  get keyHead(): Position {
    return this.core.log.keyHead;
  }
  get keyTail(): Position {
    return this.gc.keyTail;
  }

  status(): CacheStatus {
    const s = this.core.segments;
    return {
      sbFlags: this.meta.sb.flags,
      segNum: this.meta.sb.segNum,
      nSegs: s.n,
      segsUsed: s.usedSegments,
      gcPercent: this.gc.gcPercent,
      cacheFlags: this.cacheFlags,
      keyHead: this.keyHead,
      dirtyTail: this.dirtyTail,
      keyTail: this.keyTail,
      dataCrc: this.core.dataCrc,
      cacheMode: flagsMode(this.cacheFlags) ?? 'unknown',
      dirtyBytes: this.core.stats.dirtyBytes,
      indexKeys: this.core.index.size,
      openKeys: this.core.log.openKeys,
      writebackError: this.writeback.lastError,
      gcError: this.gc.lastError,
      writebackLastError: this.failures.last('writeback'),
      gcLastError: this.failures.last('gc'),
      sequentialCutoff: this.core.fills.sequentialCutoff,
      fillBacklogBytes: this.core.fills.backlog,
      counters: { ...this.core.stats },
    };
  }

  /**
   * Write back everything dirty: close the open kset, then wait until dirty_tail reaches key_head.
   * `onProgress` sees each step; a write-back error rejects once `maxErrors` retries have failed.
   */
  async drain(opts: { onProgress?: (s: CacheStatus) => void; maxErrors?: number } = {}): Promise<void> {
    // The engine's timers are unref'd; while someone waits for the drain, the process stays up
    // (an offline drain would otherwise exit in the middle of a retry back-off).
    const keepAlive = setInterval(() => undefined, 1 << 30);
    try {
      await this.persistLog();
      let errors = 0;
      while (!this.writeback.clean) {
        // A stopped write-back engine wakes nobody: waiting on would hold the process forever.
        if (this.closed) throw new CacheError('the cache was closed before write-back finished', 'EIO');
        const before = this.core.stats.writebackErrors;
        const p = this.writeback.progress();
        this.writeback.kick();
        await p;
        opts.onProgress?.(this.status());
        if (this.core.stats.writebackErrors > before && ++errors > (opts.maxErrors ?? Infinity)) {
          throw new CacheError(`write-back failed: ${this.writeback.lastError}`, 'EIO');
        }
      }
    } finally {
      clearInterval(keepAlive);
    }
  }

  /** Clean shutdown: finish requests in flight, write the open kset, sync, stop the engines. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.spaceTimer);
    await this.idle();
    try {
      await this.persistLog();
    } finally {
      this.core.log.stop();
      await this.writeback.stop();
      await this.gc.stop();
      await this.core.segments.settle();
      await this.core.medium.sync();
    }
  }

  /** Stop timers and engines without writing anything: the state a crash leaves (tests). */
  async abandon(): Promise<void> {
    this.closed = true;
    clearInterval(this.spaceTimer);
    this.core.log.stop();
    await this.writeback.stop();
    await this.gc.stop();
  }
}
