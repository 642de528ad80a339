/**
 * What a crash may legally leave, sector by sector.
 *
 * Every write gets an id (0 is the device's initial content) and tags its sectors with it (see
 * tags.ts). Per sector the model keeps:
 * - `view`: the value the cache was verified to hold at the last crash point (pinned);
 * - `touched`: the writes issued to it since then, in order (writes to one sector are never in
 *   flight together), and `floor`: the newest of them that a completed FLUSH or FUA made durable;
 * - `bk`: the value the backing device was verified to hold, and `chain`: the writes the cache
 *   holds that the backing device has not received yet, oldest first.
 *
 * After a crash, a sector of the cache may read as its durable floor or any write issued after it;
 * the backing device may hold its old value or any of the writes on the way to the cache's value,
 * never one the cache lost; and taken together the backing device must be one prefix of the log
 * (see `Verification.orderProblem`).
 */
import { SECTOR, readSector, type SectorValue } from './tags.js';

export interface WriteRec {
  off: number;
  len: number;
  zero: boolean;
  fua: boolean;
  acked: boolean;
  durable: boolean;
  /** Sequence numbers of the kset(s) its keys went into, as observed on the cache device. */
  ksetMin: number;
  ksetMax: number;
}

interface Touched {
  ids: number[];
  /** Index into ids of the newest durable write; -1: the pinned view is the floor. */
  floor: number;
}

export interface SectorVerdict {
  sector: number;
  /** The id the cache returned. */
  cache: number;
  /** The id the backing crash image holds. */
  backing: number;
}

export class Model {
  readonly nSectors: number;
  readonly view: Int32Array;
  readonly bk: Int32Array;
  readonly chain = new Map<number, number[]>();
  private touched = new Map<number, Touched>();
  readonly writes: WriteRec[] = [{ off: 0, len: 0, zero: false, fua: false, acked: true, durable: true, ksetMin: -1, ksetMax: -1 }];
  /** Writes acked and not yet covered by a flush that completed. */
  private ackedSinceFlush: number[] = [];
  /** Per sector, writes whose key has not been seen in a kset written to the cache device, oldest first. */
  private unlogged = new Map<number, number[]>();
  ksetSeq = 0;
  /** Keys seen in ksets that no pending write explains (an engine or harness fault). */
  readonly strayKeys: string[] = [];

  constructor(readonly deviceSize: number) {
    this.nSectors = deviceSize / SECTOR;
    this.view = new Int32Array(this.nSectors);
    this.bk = new Int32Array(this.nSectors);
  }

  /** A new write of [off, off+len) is issued. */
  issueWrite(off: number, len: number, opts: { zero: boolean; fua: boolean }): number {
    const id = this.writes.length;
    this.writes.push({ off, len, zero: opts.zero, fua: opts.fua, acked: false, durable: false, ksetMin: Infinity, ksetMax: -1 });
    for (let s = off / SECTOR; s < (off + len) / SECTOR; s++) {
      let t = this.touched.get(s);
      if (!t) this.touched.set(s, (t = { ids: [], floor: -1 }));
      t.ids.push(id);
      let q = this.unlogged.get(s);
      if (!q) this.unlogged.set(s, (q = []));
      q.push(id);
    }
    return id;
  }

  ackWrite(id: number): void {
    const w = this.writes[id]!;
    w.acked = true;
    if (w.fua) this.markDurable(id);
    else this.ackedSinceFlush.push(id);
  }

  /** A flush is issued: returns what it will make durable when it completes. */
  issueFlush(): number[] {
    const covered = this.ackedSinceFlush;
    this.ackedSinceFlush = [];
    return covered;
  }

  completeFlush(covered: readonly number[]): void {
    for (const id of covered) this.markDurable(id);
  }

  private markDurable(id: number): void {
    const w = this.writes[id]!;
    if (w.durable) return;
    w.durable = true;
    for (let s = w.off / SECTOR; s < (w.off + w.len) / SECTOR; s++) {
      const t = this.touched.get(s);
      if (!t) continue;
      const i = t.ids.lastIndexOf(id);
      if (i > t.floor) t.floor = i;
    }
  }

  /** A kset holding keys for these ranges (dirty keys only) is being written to the log. */
  ksetWritten(keys: ReadonlyArray<{ off: number; len: number }>): void {
    const seq = ++this.ksetSeq;
    for (const k of keys) {
      for (let s = Math.floor(k.off / SECTOR); s < Math.ceil((k.off + k.len) / SECTOR); s++) {
        const id = this.unlogged.get(s)?.shift();
        if (id === undefined) {
          if (this.strayKeys.length < 10) this.strayKeys.push(`kset ${seq}: key ${k.off}+${k.len} covers sector ${s}, which no pending write explains`);
          continue;
        }
        const w = this.writes[id]!;
        if (seq < w.ksetMin) w.ksetMin = seq;
        if (seq > w.ksetMax) w.ksetMax = seq;
      }
    }
  }

  /** The value a read must return now (no write to the sector is in flight). */
  latest(s: number): number {
    const t = this.touched.get(s);
    return t && t.ids.length ? t.ids[t.ids.length - 1]! : this.view[s]!;
  }

  /** Does the sector value `v` read at sector `s` equal write `id`? */
  matches(v: SectorValue, id: number): boolean {
    if (v.kind === 'tag') return v.id === id;
    if (v.kind === 'zero') return this.writes[id]!.zero;
    return false;
  }

  describe(id: number): string {
    if (id === 0) return 'initial content';
    const w = this.writes[id]!;
    return `write ${id} (${w.zero ? 'zeroes ' : ''}${w.off}+${w.len}${w.fua ? ' FUA' : ''}${w.acked ? ', acked' : ', in flight'}${w.durable ? ', durable' : ''}${w.ksetMax >= 0 ? `, kset ${w.ksetMin}..${w.ksetMax}` : ', no kset seen'})`;
  }

  /** Sectors that must be checked after a crash: written since the last one, or not yet on the backing device. */
  sectorsToVerify(): number[] {
    const set = new Set<number>(this.touched.keys());
    for (const s of this.chain.keys()) set.add(s);
    return [...set];
  }

  /** Values the cache may return at sector `s` after a crash, oldest first. */
  allowed(s: number): number[] {
    const t = this.touched.get(s);
    if (!t) return [this.view[s]!];
    return t.floor < 0 ? [this.view[s]!, ...t.ids] : t.ids.slice(t.floor);
  }

  /** The crash happened: forget writes in flight, flushes in flight and unlogged keys. */
  crashed(): void {
    this.ackedSinceFlush = [];
    this.unlogged.clear();
  }

  /** Start checking what a crash left; `commit()` pins the result. */
  verification(): Verification {
    return new Verification(this);
  }

  /** @internal */
  touchedOf(s: number): Touched | undefined {
    return this.touched.get(s);
  }

  /** @internal */
  resetTouched(): void {
    this.touched = new Map();
  }
}

/**
 * One crash point's check. Feed it every sector of `sectorsToVerify()` (and any sample of others)
 * with what the reopened cache and the crash image of the backing device hold; it throws on the
 * first value that cannot be, and `commit()` makes the verified values the new baseline.
 */
export class Verification {
  private readonly newView = new Map<number, number>();
  private readonly newBk = new Map<number, number>();
  private readonly newChain = new Map<number, number[]>();
  /** The newest kset any backing value comes from, and the oldest kset of a write the backing misses. */
  maxBackingKset = -1;
  minMissingKset = Infinity;
  maxBackingWhere = '';
  minMissingWhere = '';
  sectors = 0;

  constructor(private readonly m: Model) {}

  check(s: number, cacheVal: SectorValue, backingVal: SectorValue | null): SectorVerdict {
    const m = this.m;
    this.sectors++;
    const off = s * SECTOR;
    const allowed = m.allowed(s);
    if (cacheVal.kind === 'garbage') {
      throw new Error(`sector ${s} (byte ${off}) reads as garbage: ${cacheVal.why}; allowed: ${allowed.map((id) => m.describe(id)).join('; ')}`);
    }
    let r = -1;
    for (let i = allowed.length - 1; i >= 0; i--) {
      if (m.matches(cacheVal, allowed[i]!)) {
        r = allowed[i]!;
        break;
      }
    }
    if (r < 0) {
      const got = cacheVal.kind === 'tag' ? m.describe(cacheVal.id) : 'zeroes';
      throw new Error(`sector ${s} (byte ${off}) reads as ${got}; allowed after the crash: ${allowed.map((id) => m.describe(id)).join('; ')}`);
    }
    // The writes on the way from the backing device's value to the cache's: the old chain, then
    // the writes since the last crash point up to the one that survived.
    const t = m.touchedOf(s);
    const seq = [m.bk[s]!, ...(m.chain.get(s) ?? [])];
    if (t) {
      const i = t.ids.lastIndexOf(r);
      if (i >= 0) seq.push(...t.ids.slice(0, i + 1));
    }
    if (seq[seq.length - 1] !== r) throw new Error(`model: sector ${s}: ${r} is not the end of its history`);
    this.newView.set(s, r);
    if (!backingVal) {
      this.newBk.set(s, m.bk[s]!);
      this.newChain.set(s, seq.slice(1));
      return { sector: s, cache: r, backing: m.bk[s]! };
    }
    if (backingVal.kind === 'garbage') throw new Error(`backing sector ${s} (byte ${off}) holds garbage: ${backingVal.why}`);
    let bi = -1;
    for (let i = seq.length - 1; i >= 0; i--) {
      if (m.matches(backingVal, seq[i]!)) {
        bi = i;
        break;
      }
    }
    if (bi < 0) {
      const lost = t ? t.ids.slice(t.ids.lastIndexOf(r) + 1) : [];
      const got = backingVal.kind === 'tag' ? m.describe(backingVal.id) : 'zeroes';
      const newer = lost.some((id) => m.matches(backingVal, id));
      throw new Error(
        `backing sector ${s} (byte ${off}) holds ${got}, ` +
          (newer
            ? `newer than what the cache kept after the crash (${m.describe(r)}): write-back copied data that the crash then took from the cache`
            : `which is not on the way from its last value (${m.describe(m.bk[s]!)}) to the cache's (${m.describe(r)})`),
      );
    }
    const b = seq[bi]!;
    this.newBk.set(s, b);
    this.newChain.set(s, seq.slice(bi + 1));
    // Prefix check material: zero writes cannot be told apart, so they take no part in it.
    const bw = m.writes[b]!;
    if (b !== 0 && !bw.zero && bw.ksetMin !== Infinity && bw.ksetMin > this.maxBackingKset) {
      this.maxBackingKset = bw.ksetMin;
      this.maxBackingWhere = `sector ${s} holds ${m.describe(b)}`;
    }
    if (bi + 1 < seq.length) {
      const n = seq[bi + 1]!;
      const nw = m.writes[n]!;
      if (!nw.zero && nw.ksetMax >= 0 && nw.ksetMax < this.minMissingKset) {
        this.minMissingKset = nw.ksetMax;
        this.minMissingWhere = `sector ${s} lacks ${m.describe(n)}`;
      }
    }
    return { sector: s, cache: r, backing: b };
  }

  /**
   * The backing device receives whole ksets in log order, with a flush after each: so it holds
   * every kset before some point, part of at most one more, and nothing after. A backing value
   * from a kset later than a kset whose write it lacks breaks that.
   */
  orderProblem(): string | null {
    if (this.maxBackingKset > this.minMissingKset) {
      return `the backing device is not a prefix of the log: ${this.maxBackingWhere}, yet ${this.minMissingWhere}`;
    }
    return null;
  }

  commit(): void {
    const m = this.m;
    for (const [s, v] of this.newView) m.view[s] = v;
    for (const [s, v] of this.newBk) m.bk[s] = v;
    for (const [s, c] of this.newChain) {
      if (c.length) m.chain.set(s, c);
      else m.chain.delete(s);
    }
    m.resetTouched();
  }
}

export { readSector };
