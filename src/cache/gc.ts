import { FormatError, samePosition, validateKey, type Position } from '../format/index.js';
import type { CacheCore } from './core.js';
import { readKset } from './log.js';
import type { TwoSlotRecord } from './persist.js';

/** Ksets collected between two key_tail updates: each update costs a sync. */
const GC_BATCH = 64;
/** dm-pcache's GC work re-arms itself this often; it collects on an idle cache too. */
export const GC_INTERVAL_MS = 5000;

/**
 * Used segments at which GC collects, as dm-pcache's need_gc() computes it: n_segs * gc_percent
 * / 100 in integer arithmetic (63 segments at 70%: 44, so GC stops at 43).
 */
export function gcThreshold(nSegs: number, gcPercent: number): number {
  return Math.floor((nSegs * gcPercent) / 100);
}

/**
 * Garbage collection: from key_tail, never past dirty_tail, drop one segment reference per key of
 * each kset and advance key_tail (persisted). A LAST kset moves key_tail to the next segment and
 * frees the log segment it leaves, once the new key_tail is durable.
 */
export class Gc {
  gcPercent: number;
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;
  lastError: string | null = null;
  /** Told of every failed run, with the key_tail it stopped at. */
  onError: (err: unknown, keyTail: Position) => void = () => {};

  constructor(
    private readonly core: CacheCore,
    private keyTailPos: Position,
    private readonly keyTailRecord: TwoSlotRecord<Position>,
    private readonly dirtyTail: () => Position,
    gcPercent: number,
    private readonly intervalMs = GC_INTERVAL_MS,
  ) {
    this.gcPercent = gcPercent;
  }

  /**
   * Collect now, and every intervalMs from here on: write-back progress and writers waiting for
   * space kick GC, but a cache left idle above its threshold (after an error, a gc_percent lowered
   * while nothing ran) must still come down to it, as dm-pcache's self-re-arming GC work does.
   */
  start(): void {
    this.kick();
    this.arm();
  }

  private arm(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.kick();
      this.arm();
    }, this.intervalMs);
    // The timer keeps no process up: a waiting writer or a drain does.
    this.timer.unref();
  }

  get keyTail(): Position {
    return { ...this.keyTailPos };
  }

  /**
   * need_gc(): used segments at or above the threshold, or a writer waiting for space. Segments on
   * their way to free (their generation bump in flight) count as free already: dm-pcache frees at
   * once, and counting them would collect past the threshold while the bumps are written.
   */
  private wanted(): boolean {
    const s = this.core.segments;
    return s.waiting > 0 || this.core.stats.writesWaiting > 0 || s.usedSegments - s.retiring >= gcThreshold(s.n, this.gcPercent);
  }

  kick(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = this.loop().finally(() => {
      this.running = null;
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.running;
  }

  private async loop(): Promise<void> {
    do {
      this.again = false;
      try {
        await this.collect();
        this.lastError = null;
      } catch (err) {
        this.lastError = err instanceof Error ? err.message : String(err);
        this.onError(err, this.keyTailPos);
      }
    } while (this.again && !this.stopped);
  }

  private async collect(): Promise<void> {
    const { core } = this;
    let ran = false;
    while (!this.stopped && this.wanted() && !samePosition(this.keyTailPos, this.dirtyTail())) {
      if (!ran) {
        core.stats.gcRuns++;
        ran = true;
      }
      let leftSeg = -1;
      // wanted() is asked again for every kset: GC stops as soon as enough is on its way to free.
      for (let n = 0; n < GC_BATCH && (n === 0 || this.wanted()) && !samePosition(this.keyTailPos, this.dirtyTail()); n++) {
        const pos = this.keyTailPos;
        const kset = await readKset(core.medium, core.physOf, pos);
        if (kset instanceof FormatError) throw new Error(`gc: kset at key_tail ${pos.seg}:${pos.off}: ${kset.message}`);
        if (kset.last) {
          if (this.dirtyTail().seg === pos.seg) break;
          leftSeg = pos.seg;
          this.keyTailPos = { seg: kset.nextSeg, off: 0 };
          break;
        }
        for (const key of kset.keys) {
          if (validateKey(key, { nSegs: core.segments.n }) !== null) continue;
          // Stale keys took no reference at replay; they give none back.
          if (key.gen < core.segments.gens[key.seg]!) continue;
          core.segments.put(key.seg);
        }
        this.keyTailPos = { seg: pos.seg, off: pos.off + kset.size };
        core.stats.gcKsets++;
      }
      await this.keyTailRecord.store(this.keyTailPos);
      // (Counted in segmentsFreed by the segments' onFree hook.)
      if (leftSeg >= 0) core.segments.freeLogSegment(leftSeg);
    }
  }
}
