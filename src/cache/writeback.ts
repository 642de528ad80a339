import { dataOffset, FormatError, KEY_FLAG_CLEAN, pcacheCrc, samePosition, validateKey, type Key, type Position } from '../format/index.js';
import type { CacheCore } from './core.js';
import { KeyIndex } from './key-index.js';
import { readKset } from './log.js';
import type { TwoSlotRecord } from './persist.js';

/** Bytes per backing write: large keys are split so that several writes are in flight. */
const WB_CHUNK = 1024 * 1024;
const WB_IN_FLIGHT = 8;
const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 5000;

class Stopped extends Error {}

export function dataCrcMessage(key: Key, actual: number): string {
  // dm-pcache prints the computed value first and calls the stored one "expected".
  return `key: ${key.off}:${key.len} seg ${key.seg}:${key.segOff} data_crc error: ${actual.toString(16)}, expected: ${key.dataCrc.toString(16)}`;
}

/**
 * The write-back engine, one kset at a time from dirty_tail (spec section 6):
 * read the kset; follow a LAST kset; resolve overlaps inside the kset (later keys win); copy every
 * dirty key from the cache to the backing device, several in flight; flush the backing device once;
 * only then advance dirty_tail, durably. On any error dirty_tail stays put and the kset is retried
 * with back-off: a kset is never skipped, so the backing device is always a crash-consistent image
 * of the device at some earlier point of the log.
 */
export class Writeback {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  private backoff = 0;
  private waiters: Array<() => void> = [];
  lastError: string | null = null;

  constructor(
    private readonly core: CacheCore,
    private dirtyTailPos: Position,
    private readonly dirtyTailRecord: TwoSlotRecord<Position>,
    private readonly intervalMs: number,
    private readonly afterProgress: () => void,
  ) {}

  get dirtyTail(): Position {
    return { ...this.dirtyTailPos };
  }

  get clean(): boolean {
    return samePosition(this.dirtyTailPos, this.core.log.keyHead);
  }

  start(): void {
    this.schedule(this.intervalMs);
  }

  kick(): void {
    if (this.stopped || this.backoff > 0) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.schedule(0);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.running;
    this.wakeWaiters();
  }

  /** Resolve after the next kset is written back or the engine gives up for now. */
  progress(): Promise<void> {
    return new Promise((r) => this.waiters.push(r));
  }

  private wakeWaiters(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.running) {
        this.again = true;
        return;
      }
      this.running = this.loop().finally(() => {
        this.running = null;
      });
    }, ms);
    this.timer.unref();
  }

  private async loop(): Promise<void> {
    let next = this.intervalMs;
    for (;;) {
      this.again = false;
      let progressed: boolean;
      try {
        progressed = await this.step();
        this.backoff = 0;
        this.lastError = null;
      } catch (err) {
        if (err instanceof Stopped) break;
        this.core.stats.writebackErrors++;
        this.lastError = err instanceof Error ? err.message : String(err);
        this.backoff = Math.min(BACKOFF_MAX_MS, Math.max(BACKOFF_MIN_MS, this.backoff * 2));
        next = this.backoff;
        this.wakeWaiters();
        break;
      }
      this.wakeWaiters();
      if (this.stopped) return;
      if (progressed) {
        this.afterProgress();
        continue;
      }
      if (!this.again) break;
    }
    this.schedule(next);
  }

  /** Write back the kset at dirty_tail; false when there is none (the cache is clean for now). */
  private async step(): Promise<boolean> {
    const { core } = this;
    const pos = this.dirtyTailPos;
    if (samePosition(pos, core.log.keyHead)) return false;
    const kset = await readKset(core.medium, core.physOf, pos);
    if (kset instanceof FormatError) {
      throw new Error(`write-back: kset at dirty_tail ${pos.seg}:${pos.off} is unreadable: ${kset.message}`);
    }
    // The kset may not be durable yet (a timed close writes it without a sync after). Acting on it
    // first would let a crash keep its effects (data on the backing device, a dirty_tail past it)
    // while taking the kset itself from the cache.
    await core.medium.sync();
    if (kset.last) {
      await this.advance({ seg: kset.nextSeg, off: 0 });
      return true;
    }
    const wbIndex = new KeyIndex();
    let dirtyInKset = 0;
    for (const key of kset.keys) {
      const bad = validateKey(key, { nSegs: core.segments.n, backingSize: core.backingSize });
      if (bad) throw new Error(`write-back: ${bad.message}`);
      if (key.gen < core.segments.gens[key.seg]!) continue;
      if (!(key.flags & KEY_FLAG_CLEAN)) dirtyInKset += key.len;
      if (core.dataCrc) await this.checkCrc(key);
      wbIndex.insert(key);
    }
    const jobs: Array<{ off: number; len: number; seg: number; segOff: number }> = [];
    for (const k of wbIndex.all()) {
      if (k.flags & KEY_FLAG_CLEAN) continue;
      for (let d = 0; d < k.len; d += WB_CHUNK) {
        jobs.push({ off: k.off + d, len: Math.min(WB_CHUNK, k.len - d), seg: k.seg, segOff: k.segOff + d });
      }
    }
    let bytes = 0;
    let nextJob = 0;
    const worker = async (): Promise<void> => {
      while (nextJob < jobs.length) {
        // A stopping engine leaves the kset for next time: dirty_tail has not moved.
        if (this.stopped) throw new Stopped();
        const j = jobs[nextJob++]!;
        const buf = Buffer.allocUnsafe(j.len);
        core.segments.pin(j.seg);
        try {
          await core.medium.read(buf, dataOffset(core.physOf[j.seg]!, j.segOff));
        } finally {
          core.segments.unpin(j.seg);
        }
        await core.backing.write(buf, j.off);
        bytes += j.len;
      }
    };
    const workers = [];
    for (let i = 0; i < Math.min(WB_IN_FLIGHT, jobs.length); i++) workers.push(worker());
    const results = await Promise.allSettled(workers);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
    await core.backing.flush();
    await this.advance({ seg: pos.seg, off: pos.off + kset.size });
    core.stats.writtenBackBytes += bytes;
    core.stats.writtenBackKsets++;
    core.stats.dirtyBytes = Math.max(0, core.stats.dirtyBytes - dirtyInKset);
    return true;
  }

  private async checkCrc(key: Key): Promise<void> {
    const buf = Buffer.allocUnsafe(key.len);
    await this.core.medium.read(buf, dataOffset(this.core.physOf[key.seg]!, key.segOff));
    const crc = pcacheCrc(buf);
    if (crc !== key.dataCrc) throw new Error(`write-back: ${dataCrcMessage(key, crc)}`);
  }

  /** dirty_tail moves in memory only once durable, so GC never passes a dirty_tail a crash could undo. */
  private async advance(to: Position): Promise<void> {
    await this.dirtyTailRecord.store(to);
    this.dirtyTailPos = to;
  }
}
