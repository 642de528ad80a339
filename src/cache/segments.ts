import type { Medium } from '../media/medium.js';
import type { SlotState } from './meta.js';
import { genRecord, type TwoSlotRecord } from './persist.js';

/**
 * The cache segments: which are in use, how many logged keys point into each (plus one while a
 * segment is the data head), their generations, and pins held by I/O in flight.
 *
 * Invariants:
 * - a segment is free only when its refs and pins are 0 and its new generation is durable;
 * - a free segment is handed out at most once before it is freed again.
 */
export class Segments {
  readonly n: number;
  private readonly used: Uint8Array;
  private readonly refs: Int32Array;
  private readonly pins: Int32Array;
  /** Segments whose last reference is gone but that wait for their pins before invalidation. */
  private readonly doomed: Uint8Array;
  /** Segments whose last reference is gone and that are on their way to free. */
  private readonly retiringFlag: Uint8Array;
  private retiringCount = 0;
  readonly gens: number[];
  private readonly genRecords: TwoSlotRecord<number>[];
  private usedCount = 0;
  private lastAlloc = 0;
  private waiters: Array<() => void> = [];
  private readonly pendingGens = new Set<Promise<void>>();
  /** Retiring segments whose generation bump failed (ENOSPC on a sparse file): see retryFailedBumps. */
  private readonly bumpFailed = new Set<number>();
  /** Segments a write found without blocks (a sparse file on a full filesystem): allocate() skips them. */
  private readonly noBlocks = new Set<number>();
  /** Called whenever a segment becomes free, and whenever one is invalidated (the index sweeps). */
  onFree: () => void = () => {};
  onInvalidate: (seg: number) => void = () => {};
  onError: (err: unknown) => void = () => {};
  onNoBlocks: (seg: number) => void = () => {};

  constructor(medium: Medium, physOf: readonly number[], gens: readonly number[], genSlots: readonly SlotState[]) {
    this.n = physOf.length;
    this.used = new Uint8Array(this.n);
    this.refs = new Int32Array(this.n);
    this.pins = new Int32Array(this.n);
    this.doomed = new Uint8Array(this.n);
    this.retiringFlag = new Uint8Array(this.n);
    this.gens = [...gens];
    this.genRecords = physOf.map((phys, i) => genRecord(medium, phys, genSlots[i]!));
  }

  get usedSegments(): number {
    return this.usedCount;
  }
  get freeSegments(): number {
    return this.n - this.usedCount;
  }
  isUsed(seg: number): boolean {
    return this.used[seg] === 1;
  }
  refsOf(seg: number): number {
    return this.refs[seg]!;
  }
  get waiting(): number {
    return this.waiters.length;
  }

  /** Wait for generation updates in flight (before the medium is closed). */
  async settle(): Promise<void> {
    while (this.pendingGens.size) await Promise.all([...this.pendingGens]);
  }

  /** Replay marks what the log says is in use. */
  markUsed(seg: number): void {
    if (!this.used[seg]) {
      this.used[seg] = 1;
      this.usedCount++;
    }
  }

  /** Take a free segment (next-fit after the last one, as dm-pcache does), keeping `reserve` free. */
  allocate(reserve: number): number | null {
    if (this.freeSegments <= reserve) return null;
    for (let i = 1; i <= this.n; i++) {
      const seg = (this.lastAlloc + i) % this.n;
      if (!this.used[seg] && !this.noBlocks.has(seg)) {
        this.used[seg] = 1;
        this.usedCount++;
        this.lastAlloc = seg;
        return seg;
      }
    }
    return null;
  }

  /** Resolve once some segment has been freed (or `wake` is called); waiters are woken in the order they came. */
  waitForFree(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** A place in the queue of those waiting for a free segment (see SpaceWait). */
  spaceWait(timeoutMs: number): SpaceWait {
    return new SpaceWait(this, timeoutMs);
  }

  wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  get(seg: number, count = 1): void {
    this.refs[seg]! += count;
  }

  /** Drop a reference; the last one invalidates the segment (once no I/O pins it). */
  put(seg: number): void {
    const r = --this.refs[seg]!;
    if (r < 0) throw new Error(`segment ${seg}: reference count below zero`);
    if (r === 0) this.retire(seg);
  }

  pin(seg: number): void {
    this.pins[seg]!++;
  }

  unpin(seg: number): void {
    const p = --this.pins[seg]!;
    if (p === 0 && this.doomed[seg]) {
      this.doomed[seg] = 0;
      this.retire(seg);
    }
  }

  /** A log segment that key_tail has left (key_tail already durable): free at once, no keys point in. */
  freeLogSegment(seg: number): void {
    this.release(seg);
  }

  /**
   * Used segments that are already on their way to free: GC counts them as free, or it would go
   * on collecting while the generation bumps are still being written.
   */
  get retiring(): number {
    return this.retiringCount;
  }

  private retire(seg: number): void {
    if (this.refs[seg]! > 0 || !this.used[seg]) return;
    if (!this.retiringFlag[seg]) {
      this.retiringFlag[seg] = 1;
      this.retiringCount++;
    }
    if (this.pins[seg]! > 0) {
      this.doomed[seg] = 1;
      return;
    }
    const gen = this.gens[seg]! + 1;
    // Keys pointing here become stale at once in memory; the segment is reusable only when the
    // bump is durable, so that replay never takes reused data for an old key.
    this.gens[seg] = gen;
    this.onInvalidate(seg);
    this.storeGen(seg);
  }

  /** A write to `seg` failed for space: hand out other segments until retrySpace(). */
  markNoBlocks(seg: number): void {
    this.noBlocks.add(seg);
    this.onNoBlocks(seg);
  }

  /** Whether a free segment other than those marked without blocks is left. */
  get canAllocate(): boolean {
    for (let seg = 0; seg < this.n; seg++) if (!this.used[seg] && !this.noBlocks.has(seg)) return true;
    return false;
  }

  /** The filesystem may have room again: every free segment may be tried, every failed bump is retried. */
  retrySpace(): void {
    this.noBlocks.clear();
    this.retryFailedBumps();
  }

  /**
   * Writes again the generation bumps that failed. Until one lands its segment stays in use (not
   * lost: a full filesystem under a sparse cache file gives the blocks later).
   */
  retryFailedBumps(): void {
    const failed = [...this.bumpFailed];
    this.bumpFailed.clear();
    for (const seg of failed) this.storeGen(seg);
  }

  private storeGen(seg: number): void {
    const p = this.genRecords[seg]!.store(this.gens[seg]!).then(
      () => {
        if (this.refs[seg] === 0 && this.pins[seg] === 0) this.release(seg);
      },
      (err) => {
        this.bumpFailed.add(seg);
        this.onError(err);
      },
    );
    this.pendingGens.add(p);
    void p.finally(() => this.pendingGens.delete(p));
  }

  private release(seg: number): void {
    if (!this.used[seg]) return;
    if (this.retiringFlag[seg]) {
      this.retiringFlag[seg] = 0;
      this.retiringCount--;
    }
    this.used[seg] = 0;
    this.usedCount--;
    this.onFree();
    this.wake();
  }
}

/**
 * One waiter's place in the queue for a free segment, kept across attempts: woken by a free, it
 * takes a new place behind those woken before it (all of them woken at once, in order); woken only
 * by the time-out (a safety net against a lost wake-up), it keeps the place it has. So writers that
 * wait on a full cache get space first come, first served.
 */
export class SpaceWait {
  private turn: Promise<void> | null = null;

  constructor(
    private readonly segments: Segments,
    private readonly timeoutMs: number,
  ) {}

  async next(): Promise<void> {
    this.turn ??= this.segments.waitForFree().then(() => {
      this.turn = null;
    });
    let timer: NodeJS.Timeout | undefined;
    // Not unref'd: whoever waits here holds a request (a write, a FLUSH closing a kset).
    const timeout = new Promise<void>((r) => (timer = setTimeout(r, this.timeoutMs)));
    try {
      await Promise.race([this.turn, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}
