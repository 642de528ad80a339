import { dataOffset, FormatError, KEY_FLAG_CLEAN, pcacheCrc, samePosition, validateKey, type Key, type Position } from '../format/index.js';
import type { CacheCore } from './core.js';
import { KeyIndex } from './key-index.js';
import { readKset } from './log.js';
import type { TwoSlotRecord } from './persist.js';

/** The largest backing write: adjacent keys are merged up to it, larger keys split at it. */
export const WB_WRITE_MAX = 1024 * 1024;
/**
 * Bytes of cache data write-back holds at once, read ahead or on their way to the backing device.
 * Every key of a kset is in flight together within it; a 4 KiB-key kset takes 512 KiB.
 */
export const WB_BYTES_IN_FLIGHT = 32 * 1024 * 1024;
/** Ksets decoded ahead of the one being written back (their data read as the byte budget allows). */
const WB_AHEAD_KSETS = 8;
/**
 * Consecutive clean-only ksets (fill keys only) whose dirty_tail updates are folded into one. GC
 * waits for the persisted dirty_tail, so the batch is kept short and ends whenever write-back
 * goes idle, stops, or reaches a kset with something to write.
 */
const WB_CLEAN_BATCH = 16;
const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 5000;

class Stopped extends Error {}
/** A kset read ahead was dropped (an error or a stop restarts write-back from dirty_tail). */
class Dropped extends Error {}

/** The backing ranges a kset writes back: sorted, disjoint (they come from a write-back index). */
interface Ranges {
  starts: number[];
  ends: number[];
}

/** Whether [off, off+len) meets any of `r`. */
function meets(r: Ranges, off: number, len: number): boolean {
  // The last range starting before the end of ours is the only one that can reach into it.
  let lo = 0;
  let hi = r.starts.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (r.starts[mid]! < off + len) lo = mid + 1;
    else hi = mid;
  }
  return lo > 0 && r.ends[lo - 1]! > off;
}

/**
 * Bytes held by write-back, granted first come first served: a kset's writes never wait behind
 * the read-ahead of a later kset, which could otherwise hold the budget and wait for them.
 */
export class ByteBudget {
  private held = 0;
  private readonly queue: Array<{ n: number; go: () => void }> = [];

  constructor(
    readonly max: number,
    private readonly onChange: (held: number) => void = () => undefined,
  ) {}

  acquire(n: number): Promise<void> {
    if (this.queue.length === 0 && this.fits(n)) {
      this.held += n;
      this.onChange(this.held);
      return Promise.resolve();
    }
    return new Promise((go) => this.queue.push({ n, go }));
  }

  release(n: number): void {
    this.held -= n;
    while (this.queue.length > 0 && this.fits(this.queue[0]!.n)) {
      const w = this.queue.shift()!;
      this.held += w.n;
      w.go();
    }
    this.onChange(this.held);
  }

  /** One grant larger than the whole budget still goes through, alone. */
  private fits(n: number): boolean {
    return this.held === 0 || this.held + n <= this.max;
  }
}

/** Part of a backing write: `len` bytes of cache data at (seg, segOff), at `at` in the write's buffer. */
interface Piece {
  seg: number;
  segOff: number;
  len: number;
  at: number;
}

/** One backing write: adjacent dirty keys of a kset (up to WB_WRITE_MAX), its data read ahead. */
interface Job {
  off: number;
  len: number;
  pieces: Piece[];
  /** The data, once read from the cache device under the byte budget (held until released). */
  data: Promise<Buffer>;
}

/** A kset decoded and planned, its data being read ahead. */
interface Prepared {
  pos: Position;
  /** Where the next kset starts: after this one, or the segment a LAST kset names. */
  end: Position;
  last: boolean;
  jobs: Job[];
  ranges: Ranges;
  dirtyBytes: number;
}

/** The read-ahead of one run from a cursor; dropped whole when write-back restarts from dirty_tail. */
interface ReadAhead {
  dropped: boolean;
  ksets: Array<Promise<Prepared>>;
  /** Where the next kset to decode starts, once the last one queued is decoded. */
  end: Position;
  decoding: boolean;
  broken: boolean;
}

/**
 * Backing writes for the dirty keys of a write-back index (in backing order, disjoint): keys that
 * meet end to end share one write up to WB_WRITE_MAX; larger keys are cut at it. Pieces of one
 * write that also follow each other in the cache are read with one read.
 */
export function planWrites(keys: Iterable<Pick<Key, 'off' | 'len' | 'flags' | 'seg' | 'segOff'>>, maxWrite = WB_WRITE_MAX): Array<{ off: number; len: number; pieces: Piece[] }> {
  const jobs: Array<{ off: number; len: number; pieces: Piece[] }> = [];
  let cur: { off: number; len: number; pieces: Piece[] } | null = null;
  for (const k of keys) {
    if (k.flags & KEY_FLAG_CLEAN) continue;
    for (let done = 0; done < k.len; ) {
      if (!cur || cur.off + cur.len !== k.off + done || cur.len >= maxWrite) {
        cur = { off: k.off + done, len: 0, pieces: [] };
        jobs.push(cur);
      }
      const n = Math.min(k.len - done, maxWrite - cur.len);
      const prev = cur.pieces[cur.pieces.length - 1];
      if (prev && prev.seg === k.seg && prev.segOff + prev.len === k.segOff + done) prev.len += n;
      else cur.pieces.push({ seg: k.seg, segOff: k.segOff + done, len: n, at: cur.len });
      cur.len += n;
      done += n;
    }
  }
  return jobs;
}

export function dataCrcMessage(key: Key, actual: number): string {
  // dm-pcache prints the computed value first and calls the stored one "expected".
  return `key: ${key.off}:${key.len} seg ${key.seg}:${key.segOff} data_crc error: ${actual.toString(16)}, expected: ${key.dataCrc.toString(16)}`;
}

/**
 * The write-back engine, kset by kset from dirty_tail (spec section 6): read the kset; follow a
 * LAST kset; resolve overlaps inside the kset (later keys win); copy every dirty key from the cache
 * to the backing device; flush the backing device once; only then advance dirty_tail, durably. On
 * any error dirty_tail stays put and the kset is retried with back-off: a kset is never skipped, so
 * the backing device is always a crash-consistent image of the device at some earlier point of the
 * log.
 *
 * A pipeline keeps a slow backing device busy without changing that order:
 * - every backing write of a kset is in flight at once (keys adjacent on the backing device merged
 *   into one write up to 1 MiB), bounded by the bytes write-back holds (WB_BYTES_IN_FLIGHT), not by
 *   a count: over a high-latency backing a kset costs about one round trip and one flush;
 * - the next ksets (up to WB_AHEAD_KSETS) are read from the cache, decoded, checked and planned,
 *   and their data read, while the kset before is written and flushed. Only their backing writes
 *   wait: they start once the flush of the kset before has completed. Their segments stay pinned
 *   until their data is read (spec section 8);
 * - the dirty_tail update of kset K runs while kset K+1 is written. The order stays as the spec
 *   has it: K+1's backing flush, and its own dirty_tail update, wait for K's update, so updates
 *   reach the two-slot record in log order and the persisted dirty_tail is never more than one
 *   kset behind what the backing device holds; and a backing write of K+1 that meets a range K
 *   wrote waits for K's update too. Until that update is durable, a crash makes write-back start
 *   again from K and rewrite K's data: over a newer value of K+1 that would take that sector of
 *   the backing device back in time. (A crash leaves the backing device as K complete plus part
 *   of K+1: a prefix of the log, as without overlap.) If K's update fails, write-back stops
 *   copying K+1, reports the error and resumes later from the persisted dirty_tail (K).
 * A kset with nothing to write (only CLEAN fill keys) costs no backing flush, and the dirty_tail
 * updates of up to WB_CLEAN_BATCH such ksets in a row are folded into one (see step()).
 * GC and drain() see only the persisted dirty_tail (`dirtyTail`, `clean`), never one in flight.
 */
export class Writeback {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  private backoff = 0;
  private waiters: Array<() => void> = [];
  /** The next kset to write back: dirty_tail, or the end of the kset whose dirty_tail update is in flight. */
  private cursor: Position;
  /** The dirty_tail update in flight (it never rejects: a failure is left in persistFailed). */
  private persisting: Promise<void> | null = null;
  /** The backing ranges of the kset whose dirty_tail update is in flight (none for a LAST kset). */
  private persistingRanges: Ranges | null = null;
  /**
   * Clean-only ksets passed but not yet persisted: their dirty_tail update is folded into the next
   * one (see step()). Dropped on a restart: the ksets are simply passed again.
   */
  private deferred: { to: Position; count: number; done: Array<() => void> } | null = null;
  /** A dirty_tail update failed; not yet reported. */
  private persistFailed: { err: unknown } | null = null;
  private readonly budget: ByteBudget;
  private ahead: ReadAhead;
  lastError: string | null = null;
  /** Told of every failed attempt, with the persisted dirty_tail it will be retried from. */
  onError: (err: unknown, dirtyTail: Position) => void = () => {};

  constructor(
    private readonly core: CacheCore,
    /** The persisted dirty_tail: moved only once its update is durable. */
    private dirtyTailPos: Position,
    private readonly dirtyTailRecord: TwoSlotRecord<Position>,
    private readonly intervalMs: number,
    private readonly afterProgress: () => void,
    bytesInFlight = WB_BYTES_IN_FLIGHT,
  ) {
    this.cursor = dirtyTailPos;
    this.budget = new ByteBudget(bytesInFlight, (held) => (core.stats.writebackBytesHeld = held));
    this.ahead = this.newReadAhead(dirtyTailPos);
  }

  /**
   * The persisted dirty_tail. GC reads it to know how far it may collect: a dirty_tail whose update
   * is still in flight could be undone by a crash, so it is not shown until durable.
   */
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
      // A kset just written is read ahead at once if there is room, not when its turn comes.
      this.readAhead();
      return;
    }
    this.schedule(0);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.running;
    this.dropReadAhead(this.cursor);
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
        // The dirty_tail update in flight (of the kset before) lands or fails first; either way
        // write-back resumes from the persisted dirty_tail. Its failure is the one to report.
        const failed = await this.takePersistResult();
        this.restartFrom(this.dirtyTailPos);
        if (!failed && err instanceof Stopped) break;
        next = this.failed(failed ? failed.err : err);
        break;
      }
      // (Waiters are woken, and GC kicked, as each dirty_tail update completes: beginAdvance().)
      if (this.stopped) {
        // Clean ksets passed before the stop are not passed again on the next start.
        try {
          await this.persistDeferred();
        } catch (err) {
          this.restartFrom(this.dirtyTailPos);
          next = this.failed(err);
        }
        break;
      }
      if (progressed) continue;
      if (!this.again) break;
    }
    // No dirty_tail update outlives the loop: stop() (close, abandon) and drain() wait for it.
    const failed = await this.takePersistResult();
    if (failed) {
      this.restartFrom(this.dirtyTailPos);
      next = this.failed(failed.err);
    }
    this.wakeWaiters();
    this.schedule(next);
  }

  /** Count and report a write-back error; the back-off before the next attempt. */
  private failed(err: unknown): number {
    this.core.stats.writebackErrors++;
    this.lastError = err instanceof Error ? err.message : String(err);
    this.onError(err, this.dirtyTailPos);
    this.backoff = Math.min(BACKOFF_MAX_MS, Math.max(BACKOFF_MIN_MS, this.backoff * 2));
    return this.backoff;
  }

  /** Go on from `pos` (the persisted dirty_tail after an error): what was read ahead is dropped. */
  private restartFrom(pos: Position): void {
    this.cursor = pos;
    this.deferred = null;
    this.dropReadAhead(pos);
  }

  /**
   * Write back the next kset (at dirty_tail, or after the one whose dirty_tail update is in flight);
   * false when there is none (the cache is clean for now).
   */
  private async step(): Promise<boolean> {
    const { core } = this;
    const next = this.nextKset();
    if (!next) {
      // Idle: clean ksets passed are persisted now, so GC may collect them.
      if (this.deferred) {
        await this.persistDeferred();
        return true;
      }
      // The dirty_tail update in flight lands first (drain() waits for it; a failure is reported).
      await this.settleAdvance();
      return false;
    }
    const k = await next;
    if (k.last) {
      // Updates reach the two-slot record one at a time, in log order.
      await this.settleAdvance();
      this.beginAdvance(k.end, null, this.takeDeferredDone(() => undefined));
      this.cursor = k.end;
      return true;
    }
    if (k.jobs.length === 0) {
      // Every key is CLEAN (fills) or stale: nothing goes to the backing device, so there is no
      // backing write for a FLUSH to order (spec section 6, step 5) and the backing device is
      // unchanged. Its dirty_tail update is folded into the next one: a crash before that only
      // makes write-back pass these ksets again, and GC waits for the persisted dirty_tail, so
      // key_tail <= dirty_tail holds on media throughout.
      const done = (): void => {
        core.stats.writtenBackKsets++;
        core.stats.dirtyBytes = Math.max(0, core.stats.dirtyBytes - k.dirtyBytes);
      };
      this.deferred = { to: k.end, count: (this.deferred?.count ?? 0) + 1, done: [...(this.deferred?.done ?? []), done] };
      this.cursor = k.end;
      if (this.deferred.count >= WB_CLEAN_BATCH) await this.persistDeferred();
      return true;
    }
    // The kset before this one, if its dirty_tail update is still in flight (see the class comment).
    const prevRanges = this.persistingRanges;
    let bytes = 0;
    let failed = false;
    const writes = k.jobs.map(async (job) => {
      let buf: Buffer;
      try {
        buf = await job.data;
      } catch (err) {
        // (The read gave its budget back.)
        failed = true;
        throw err;
      }
      try {
        // A stopping engine leaves the kset for next time: dirty_tail has not moved.
        if (this.stopped) throw new Stopped();
        // The previous kset's dirty_tail update failed, or a write of this kset did: stop here,
        // the loop reports it.
        this.throwIfPersistFailed();
        if (failed) throw new Dropped();
        if (prevRanges && this.persisting && meets(prevRanges, job.off, job.len)) {
          // A crash before that update is durable rewrites the previous kset over this range.
          await this.persisting;
          this.throwIfPersistFailed();
        }
        await core.backing.write(buf, job.off);
        bytes += job.len;
      } catch (err) {
        failed = true;
        throw err;
      } finally {
        this.budget.release(job.len);
      }
    });
    const results = await Promise.allSettled(writes);
    const errs = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => r.reason as unknown);
    // The first error that says why (not a write that stopped because another had failed).
    if (errs.length) throw errs.find((e) => !(e instanceof Dropped)) ?? errs[0];
    // The previous kset's dirty_tail update completes before this kset's flush and its own update.
    await this.settleAdvance();
    await core.backing.flush();
    // Not awaited: the next kset is written while this update is on its way. It also covers the
    // clean ksets passed just before this one.
    this.beginAdvance(
      k.end,
      k.ranges,
      this.takeDeferredDone(() => {
        core.stats.writtenBackBytes += bytes;
        core.stats.writtenBackKsets++;
        core.stats.dirtyBytes = Math.max(0, core.stats.dirtyBytes - k.dirtyBytes);
      }),
    );
    this.cursor = k.end;
    return true;
  }

  private newReadAhead(from: Position): ReadAhead {
    return { dropped: false, ksets: [], end: from, decoding: false, broken: false };
  }

  /** The kset at the cursor, from the read-ahead (started now if it was not); null at key_head. */
  private nextKset(): Promise<Prepared> | null {
    this.readAhead();
    const next = this.ahead.ksets.shift() ?? null;
    // The slot it leaves is taken by the next kset as soon as the one being decoded is.
    this.readAhead();
    return next;
  }

  /**
   * Queue ksets to decode, one after another (each one's size says where the next starts), up to
   * WB_AHEAD_KSETS ahead. A kset that fails to decode ends the read-ahead there: its error is
   * raised when write-back reaches it, after the ksets before it are written back.
   */
  private readAhead(): void {
    const ra = this.ahead;
    while (!ra.dropped && !ra.decoding && !ra.broken && !this.stopped && ra.ksets.length < WB_AHEAD_KSETS && !samePosition(ra.end, this.core.log.keyHead)) {
      const p = this.prepare(ra.end, ra);
      ra.ksets.push(p);
      ra.decoding = true;
      // Settled before anyone awaiting `p` resumes: the next kset is queued by then.
      p.then(
        (k) => {
          ra.decoding = false;
          ra.end = k.end;
          this.readAhead();
        },
        () => {
          ra.decoding = false;
          ra.broken = true;
        },
      );
    }
    if (ra === this.ahead) this.core.stats.writebackKsetsAhead = ra.ksets.length;
  }

  /** Drop what was read ahead (its budget is given back as its reads settle); read again from `from`. */
  private dropReadAhead(from: Position): void {
    const old = this.ahead;
    old.dropped = true;
    for (const p of old.ksets) {
      p.then(
        (k) => {
          for (const job of k.jobs) job.data.then(() => this.budget.release(job.len), () => undefined);
        },
        () => undefined,
      );
    }
    this.ahead = this.newReadAhead(from);
    this.core.stats.writebackKsetsAhead = 0;
  }

  /**
   * Read the kset at `pos` and plan its backing writes; start reading their data under the byte
   * budget (in log order: a later kset's data never takes the budget before an earlier one's).
   */
  private async prepare(pos: Position, ra: ReadAhead): Promise<Prepared> {
    const { core } = this;
    const kset = await readKset(core.medium, core.physOf, pos);
    if (kset instanceof FormatError) {
      throw new Error(`write-back: kset at dirty_tail ${pos.seg}:${pos.off} is unreadable: ${kset.message}`);
    }
    // The kset may not be durable yet (a timed close writes it without a sync after). Acting on it
    // first would let a crash keep its effects (data on the backing device, a dirty_tail past it)
    // while taking the kset itself from the cache. Most ksets are durable already (the next kset's
    // write, a FLUSH or an earlier write-back sync synced after them): the log knows which.
    if (!core.log.isDurable(pos)) await core.log.sync();
    if (kset.last) return { pos, end: { seg: kset.nextSeg, off: 0 }, last: true, jobs: [], ranges: { starts: [], ends: [] }, dirtyBytes: 0 };
    const wbIndex = new KeyIndex();
    let dirtyBytes = 0;
    for (const key of kset.keys) {
      const bad = validateKey(key, { nSegs: core.segments.n, backingSize: core.backingSize });
      if (bad) throw new Error(`write-back: ${bad.message}`);
      if (key.gen < core.segments.gens[key.seg]!) continue;
      if (!(key.flags & KEY_FLAG_CLEAN)) dirtyBytes += key.len;
      if (core.dataCrc) await this.checkCrc(key);
      wbIndex.insert(key);
    }
    if (ra.dropped) throw new Dropped();
    const planned = planWrites(wbIndex.all());
    const jobs: Job[] = planned.map((j) => ({ ...j, data: this.readJob(j, ra) }));
    // Jobs are in offset order and disjoint, as the index yields them.
    const ranges: Ranges = { starts: jobs.map((j) => j.off), ends: jobs.map((j) => j.off + j.len) };
    return { pos, end: { seg: pos.seg, off: pos.off + kset.size }, last: false, jobs, ranges, dirtyBytes };
  }

  /**
   * A job's data from the cache device. Its segments are pinned from now until the data is read:
   * while it waits for the budget as well as during the reads. On success the budget stays held
   * (released after the backing write, or when the read-ahead is dropped); on failure it is given
   * back here.
   */
  private readJob(job: { len: number; pieces: Piece[] }, ra: ReadAhead): Promise<Buffer> {
    const { core } = this;
    for (const p of job.pieces) core.segments.pin(p.seg);
    const read = (async (): Promise<Buffer> => {
      let unpinned = false;
      const unpin = (): void => {
        if (unpinned) return;
        unpinned = true;
        for (const p of job.pieces) core.segments.unpin(p.seg);
      };
      try {
        await this.budget.acquire(job.len);
      } catch (err) {
        unpin();
        throw err;
      }
      try {
        if (ra.dropped) throw new Dropped();
        const buf = Buffer.allocUnsafe(job.len);
        for (const p of job.pieces) await core.medium.read(buf.subarray(p.at, p.at + p.len), dataOffset(core.physOf[p.seg]!, p.segOff));
        return buf;
      } catch (err) {
        this.budget.release(job.len);
        throw err;
      } finally {
        unpin();
      }
    })();
    // Awaited by the write or the drop of its kset; a kset dropped before it is decoded never awaits it.
    read.catch(() => undefined);
    return read;
  }

  private async checkCrc(key: Key): Promise<void> {
    const buf = Buffer.allocUnsafe(key.len);
    await this.core.medium.read(buf, dataOffset(this.core.physOf[key.seg]!, key.segOff));
    const crc = pcacheCrc(buf);
    if (crc !== key.dataCrc) throw new Error(`write-back: ${dataCrcMessage(key, crc)}`);
  }

  /**
   * Start the dirty_tail update to `to` (the caller has settled the one before: at most one is in
   * flight). dirty_tail moves in memory only once durable, so GC never passes a dirty_tail a crash
   * could undo; `done` then counts the kset, GC is kicked and progress() waiters are woken.
   */
  private beginAdvance(to: Position, ranges: Ranges | null, done: () => void): void {
    const p = this.dirtyTailRecord.store(to).then(
      () => {
        this.dirtyTailPos = to;
        done();
        this.afterProgress();
        this.wakeWaiters();
      },
      (err: unknown) => {
        this.persistFailed = { err };
      },
    );
    this.persisting = p;
    this.persistingRanges = ranges;
    void p.finally(() => {
      if (this.persisting !== p) return;
      this.persisting = null;
      this.persistingRanges = null;
    });
  }

  /** Start persisting the clean ksets passed, once the update in flight has landed (throws if it failed). */
  private async persistDeferred(): Promise<void> {
    if (!this.deferred) return;
    await this.settleAdvance();
    const to = this.deferred.to;
    this.beginAdvance(to, null, this.takeDeferredDone(() => undefined));
  }

  /** `done` for an update that also covers the deferred clean ksets (which it takes). */
  private takeDeferredDone(done: () => void): () => void {
    const before = this.deferred?.done ?? [];
    this.deferred = null;
    return () => {
      for (const f of before) f();
      done();
    };
  }

  /** For the copy of the next kset: stop if the update before failed (left for the loop to report). */
  private throwIfPersistFailed(): void {
    if (this.persistFailed) throw this.persistFailed.err;
  }

  /** Wait for the dirty_tail update in flight, if any; its failure, taken (reported once). */
  private async takePersistResult(): Promise<{ err: unknown } | null> {
    if (this.persisting) await this.persisting;
    const failed = this.persistFailed;
    this.persistFailed = null;
    return failed;
  }

  /** Wait for the dirty_tail update in flight, if any; throw if it failed. */
  private async settleAdvance(): Promise<void> {
    const failed = await this.takePersistResult();
    if (failed) throw failed.err;
  }
}
