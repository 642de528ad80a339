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
 *
 * One overlap, to hide the cost of a dirty_tail update (a write and a sync of the cache device):
 * once kset K's backing flush has completed, its dirty_tail update runs while write-back reads kset
 * K+1 and issues its backing writes. The order stays as the spec has it:
 * - K+1's backing writes start after K's backing flush completed (K is whole on the backing device);
 * - K+1's backing flush, and its own dirty_tail update, wait for K's update to complete, so updates
 *   reach the two-slot record in log order and the persisted dirty_tail is never more than one kset
 *   behind what the backing device holds;
 * - a backing write of K+1 that meets a range K wrote waits for K's update too. Until that update
 *   is durable, a crash makes write-back start again from K and rewrite K's data: over a newer
 *   value of K+1 that would take that sector of the backing device back in time. (A crash leaves
 *   the backing device as K complete plus part of K+1: a prefix of the log, as without overlap.)
 * - if K's update fails, write-back stops copying K+1, reports the error and resumes later from
 *   the persisted dirty_tail (K), as for any other error.
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
  /** A dirty_tail update failed; not yet reported. */
  private persistFailed: { err: unknown } | null = null;
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
  ) {
    this.cursor = dirtyTailPos;
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
        // The dirty_tail update in flight (of the kset before) lands or fails first; either way
        // write-back resumes from the persisted dirty_tail. Its failure is the one to report.
        const failed = await this.takePersistResult();
        this.cursor = this.dirtyTailPos;
        if (!failed && err instanceof Stopped) break;
        next = this.failed(failed ? failed.err : err);
        break;
      }
      // (Waiters are woken, and GC kicked, as each dirty_tail update completes: beginAdvance().)
      if (this.stopped) break;
      if (progressed) continue;
      if (!this.again) break;
    }
    // No dirty_tail update outlives the loop: stop() (close, abandon) and drain() wait for it.
    const failed = await this.takePersistResult();
    if (failed) {
      this.cursor = this.dirtyTailPos;
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

  /**
   * Write back the next kset (at dirty_tail, or after the one whose dirty_tail update is in flight);
   * false when there is none (the cache is clean for now).
   */
  private async step(): Promise<boolean> {
    const { core } = this;
    const pos = this.cursor;
    if (samePosition(pos, core.log.keyHead)) {
      // Idle: the dirty_tail update in flight lands first (drain() waits for it; a failure is reported).
      await this.settleAdvance();
      return false;
    }
    const kset = await readKset(core.medium, core.physOf, pos);
    if (kset instanceof FormatError) {
      throw new Error(`write-back: kset at dirty_tail ${pos.seg}:${pos.off} is unreadable: ${kset.message}`);
    }
    // The kset may not be durable yet (a timed close writes it without a sync after). Acting on it
    // first would let a crash keep its effects (data on the backing device, a dirty_tail past it)
    // while taking the kset itself from the cache. Most ksets are durable already (the next kset's
    // write, a FLUSH or an earlier write-back sync synced after them): the log knows which.
    if (!core.log.isDurable(pos)) await core.log.sync();
    if (kset.last) {
      // Updates reach the two-slot record one at a time, in log order.
      await this.settleAdvance();
      const to = { seg: kset.nextSeg, off: 0 };
      this.beginAdvance(to, null, () => undefined);
      this.cursor = to;
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
    // Jobs are in offset order and disjoint, as the index yields them.
    const ranges: Ranges = { starts: jobs.map((j) => j.off), ends: jobs.map((j) => j.off + j.len) };
    // The kset before this one, if its dirty_tail update is still in flight (see the class comment).
    const prevRanges = this.persistingRanges;
    let bytes = 0;
    let nextJob = 0;
    const worker = async (): Promise<void> => {
      while (nextJob < jobs.length) {
        // A stopping engine leaves the kset for next time: dirty_tail has not moved.
        if (this.stopped) throw new Stopped();
        // The previous kset's dirty_tail update failed: stop here, the loop reports it.
        this.throwIfPersistFailed();
        const j = jobs[nextJob++]!;
        const buf = Buffer.allocUnsafe(j.len);
        core.segments.pin(j.seg);
        try {
          await core.medium.read(buf, dataOffset(core.physOf[j.seg]!, j.segOff));
        } finally {
          core.segments.unpin(j.seg);
        }
        if (prevRanges && this.persisting && meets(prevRanges, j.off, j.len)) {
          // A crash before that update is durable rewrites the previous kset over this range.
          await this.persisting;
        }
        // Checked again after the read: with the update failed, the previous kset will be written
        // again, and this write may have just waited for the update to fail.
        this.throwIfPersistFailed();
        await core.backing.write(buf, j.off);
        bytes += j.len;
      }
    };
    const workers = [];
    for (let i = 0; i < Math.min(WB_IN_FLIGHT, jobs.length); i++) workers.push(worker());
    const results = await Promise.allSettled(workers);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
    // The previous kset's dirty_tail update completes before this kset's flush and its own update.
    await this.settleAdvance();
    await core.backing.flush();
    // Not awaited: the next kset is read and copied while this update is on its way.
    const end = { seg: pos.seg, off: pos.off + kset.size };
    this.beginAdvance(end, ranges, () => {
      core.stats.writtenBackBytes += bytes;
      core.stats.writtenBackKsets++;
      core.stats.dirtyBytes = Math.max(0, core.stats.dirtyBytes - dirtyInKset);
    });
    this.cursor = end;
    return true;
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
