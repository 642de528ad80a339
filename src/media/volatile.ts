/**
 * What a device holds versus what would survive a power cut. Reads see every completed write;
 * only writes that completed before a sync began are durable. Shared by CrashMedium and
 * MemoryBacking.
 */

export const SECTOR = 512;

export interface PendingWrite {
  readonly offset: number;
  readonly data: Buffer;
  seq: number;
}

export class VolatileImage {
  /** What reads see. */
  readonly current: Buffer;
  private readonly durable: Buffer | null;
  private readonly inflight = new Set<PendingWrite>();
  /** Completed, not yet durable, in completion order. */
  private completed: PendingWrite[] = [];
  private seq = 0;

  /** Takes ownership of `image`. Without `track`, only `current` is kept, and crash() is unavailable. */
  constructor(image: Buffer, track: boolean) {
    this.current = image;
    this.durable = track ? Buffer.from(image) : null;
  }

  get tracking(): boolean {
    return this.durable !== null;
  }

  /** Called when a write is issued: from now until a sync covers it, a crash may or may not keep it. */
  begin(offset: number, data: Buffer): PendingWrite {
    const w: PendingWrite = { offset, data, seq: 0 };
    if (this.durable) this.inflight.add(w);
    return w;
  }

  land(w: PendingWrite): void {
    w.data.copy(this.current, w.offset);
    if (!this.durable) return;
    this.inflight.delete(w);
    w.seq = ++this.seq;
    this.completed.push(w);
  }

  /** A write that failed changes nothing. */
  drop(w: PendingWrite): void {
    this.inflight.delete(w);
  }

  /** Taken when a sync starts: it covers the writes completed so far, not those still in flight. */
  mark(): number {
    return this.seq;
  }

  persist(mark: number): void {
    if (!this.durable) return;
    let i = 0;
    for (; i < this.completed.length && this.completed[i]!.seq <= mark; i++) {
      const w = this.completed[i]!;
      w.data.copy(this.durable, w.offset);
    }
    this.completed.splice(0, i);
  }

  /**
   * The image a power cut now would leave: everything synced, plus each 512-byte sector of each
   * unsynced or in-flight write independently kept or lost, overlapping writes landing in a
   * random order. Leaves this image as it was, so a test can take several.
   */
  crash(rng: () => number): Buffer {
    if (!this.durable) throw new Error('crash() needs a device created with crash tracking');
    const out = Buffer.from(this.durable);
    const writes = [...this.completed, ...this.inflight];
    for (let i = writes.length - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      [writes[i], writes[j]] = [writes[j]!, writes[i]!];
    }
    for (const w of writes) {
      const end = w.offset + w.data.length;
      for (let pos = w.offset; pos < end; ) {
        const next = Math.min(end, (Math.floor(pos / SECTOR) + 1) * SECTOR);
        if (rng() < 0.5) w.data.copy(out, pos, pos - w.offset, next - w.offset);
        pos = next;
      }
    }
    return out;
  }
}

/** A small seeded generator (mulberry32), so crash tests can be replayed from their seed. */
export function seededRng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
