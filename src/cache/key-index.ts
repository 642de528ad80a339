import { KEY_FLAG_EMPTY, SUBTREE_SIZE } from '../format/index.js';

/** Identifies the EMPTY placeholder of one miss fill, so the fill finds what is left of it. */
export interface FillToken {
  readonly id: number;
}

/** A key in memory. EMPTY keys (placeholders for fills in flight) are never written to media. */
export interface IndexKey {
  readonly off: number;
  readonly len: number;
  readonly flags: number;
  readonly seg: number;
  readonly segOff: number;
  readonly gen: number;
  readonly fill?: FillToken;
}

export function isPlaceholder(k: IndexKey): boolean {
  return (k.flags & KEY_FLAG_EMPTY) !== 0;
}

/*
 * A subtree holds its keys packed in one Uint32Array, STRIDE words per key, ordered by offset:
 * a million cached keys cost tens of megabytes, not a million objects (the target is under 100
 * bytes per key; one JS object per key alone costs more than that). Offsets are relative to the
 * subtree, so they fit 32 bits. A generation (below 2^53, as the format's decoder guarantees)
 * keeps its low 32 bits in GEN_LO and the rest above the flags' byte in FLAGS_GEN_HI. An EMPTY
 * placeholder has no cache position or generation; its fill token's id takes the generation's place.
 */
const STRIDE = 6;
const OFF = 0;
const LEN = 1;
const SEG = 2;
const SEG_OFF = 3;
const GEN_LO = 4;
const FLAGS_GEN_HI = 5;
const TWO32 = 2 ** 32;
const MAX_GEN = Number.MAX_SAFE_INTEGER;
const FIRST_CAPACITY = 8;

class Subtree {
  words: Uint32Array;
  n = 0;
  constructor(capacity: number) {
    this.words = new Uint32Array(capacity * STRIDE);
  }
}

function genOf(w: Uint32Array, i: number): number {
  return (w[i + FLAGS_GEN_HI]! >>> 8) * TWO32 + w[i + GEN_LO]!;
}

function keyAt(s: Subtree, i: number, base: number): IndexKey {
  const w = s.words;
  const p = i * STRIDE;
  const flags = w[p + FLAGS_GEN_HI]! & 0xff;
  const off = base + w[p + OFF]!;
  const len = w[p + LEN]!;
  if (flags & KEY_FLAG_EMPTY) return { off, len, flags, seg: 0, segOff: 0, gen: 0, fill: { id: genOf(w, p) } };
  return { off, len, flags, seg: w[p + SEG]!, segOff: w[p + SEG_OFF]!, gen: genOf(w, p) };
}

function store(w: Uint32Array, p: number, rel: number, len: number, flags: number, seg: number, segOff: number, gen: number): void {
  w[p + OFF] = rel;
  w[p + LEN] = len;
  w[p + SEG] = seg;
  w[p + SEG_OFF] = segOff;
  w[p + GEN_LO] = gen % TWO32;
  w[p + FLAGS_GEN_HI] = (flags & 0xff) | (Math.floor(gen / TWO32) << 8);
}

/**
 * The key tree: for each 4 MiB stretch of the backing device, its keys ordered by offset and never
 * overlapping. A newer key replaces whatever it overlaps: older keys are cut at the front, cut at
 * the back, split in two, or deleted. Keys never cross a 4 MiB boundary (the write path splits).
 *
 * Keys go in and come out as IndexKey values; the index keeps none of the objects it is given, so
 * a key is found again by its value (remove), never by identity.
 */
export class KeyIndex {
  private readonly trees = new Map<number, Subtree>();
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** First key in `s` whose end is after `rel` (an offset relative to the subtree). */
  private static firstEndingAfter(s: Subtree, rel: number): number {
    const w = s.words;
    let lo = 0;
    let hi = s.n;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const p = mid * STRIDE;
      if (w[p + OFF]! + w[p + LEN]! <= rel) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Replace keys [i, j) of `s` by `k` empty slots (contents left to the caller). */
  private static resize(s: Subtree, i: number, j: number, k: number): void {
    const n = s.n + k - (j - i);
    if (n * STRIDE > s.words.length) {
      const grown = new Uint32Array(Math.max(n, s.n * 2, FIRST_CAPACITY) * STRIDE);
      grown.set(s.words.subarray(0, i * STRIDE));
      grown.set(s.words.subarray(j * STRIDE, s.n * STRIDE), (i + k) * STRIDE);
      s.words = grown;
    } else if (k !== j - i) {
      s.words.copyWithin((i + k) * STRIDE, j * STRIDE, s.n * STRIDE);
    }
    s.n = n;
  }

  insert(key: IndexKey): void {
    const t = Math.floor(key.off / SUBTREE_SIZE);
    const base = t * SUBTREE_SIZE;
    let s = this.trees.get(t);
    if (!s) {
      s = new Subtree(FIRST_CAPACITY);
      this.trees.set(t, s);
    }
    const gen = key.fill ? key.fill.id : key.gen;
    if (!(key.len > 0 && key.off - base + key.len <= SUBTREE_SIZE)) throw new RangeError(`index: key ${key.off}:${key.len} crosses a subtree`);
    if (!(gen >= 0 && gen <= MAX_GEN)) throw new RangeError(`index: generation ${gen} out of range`);
    const rel = key.off - base;
    const end = rel + key.len;
    const w0 = s.words;
    const i = KeyIndex.firstEndingAfter(s, rel);
    let j = i;
    // What survives of the first and last overlapped keys: [front, rel) and [end, backEnd).
    let front = -1;
    let back = -1;
    while (j < s.n && w0[j * STRIDE + OFF]! < end) {
      const p = j * STRIDE;
      if (w0[p + OFF]! < rel) front = j;
      if (w0[p + OFF]! + w0[p + LEN]! > end) back = j;
      j++;
    }
    const frontWords = front >= 0 ? w0.slice(front * STRIDE, front * STRIDE + STRIDE) : null;
    const backWords = back >= 0 ? w0.slice(back * STRIDE, back * STRIDE + STRIDE) : null;
    const k = 1 + (frontWords ? 1 : 0) + (backWords ? 1 : 0);
    KeyIndex.resize(s, i, j, k);
    const w = s.words;
    let p = i * STRIDE;
    if (frontWords) {
      w.set(frontWords, p);
      w[p + LEN] = rel - frontWords[OFF]!;
      p += STRIDE;
    }
    store(w, p, rel, key.len, key.flags, key.seg, key.segOff, gen);
    p += STRIDE;
    if (backWords) {
      w.set(backWords, p);
      const cut = end - backWords[OFF]!;
      w[p + OFF] = end;
      w[p + LEN] = backWords[LEN]! - cut;
      // A placeholder has no cache position to move with the cut.
      if (!(backWords[FLAGS_GEN_HI]! & KEY_FLAG_EMPTY)) w[p + SEG_OFF] = backWords[SEG_OFF]! + cut;
    }
    this.count += k - (j - i);
  }

  private static cut(s: Subtree, i: number, n: number): void {
    KeyIndex.resize(s, i, i + n, 0);
  }

  /**
   * Visit the range [off, off+len) in order: `hit` for each key overlapping it (clipped to the
   * range), `gap` for each stretch with no key. Keys for which `stale` is true are removed and
   * their range reported as a gap.
   */
  walk(
    off: number,
    len: number,
    stale: (k: IndexKey) => boolean,
    hit: (k: IndexKey, from: number, to: number) => void,
    gap: (from: number, to: number) => void,
  ): void {
    const end = off + len;
    let cur = off;
    let t = Math.floor(off / SUBTREE_SIZE);
    while (cur < end) {
      const base = t * SUBTREE_SIZE;
      const tEnd = Math.min(end, base + SUBTREE_SIZE);
      const s = this.trees.get(t);
      if (s) {
        let i = KeyIndex.firstEndingAfter(s, cur - base);
        while (i < s.n && base + s.words[i * STRIDE + OFF]! < tEnd) {
          const k = keyAt(s, i, base);
          if (stale(k)) {
            KeyIndex.cut(s, i, 1);
            this.count--;
            continue;
          }
          const from = Math.max(k.off, cur);
          if (from > cur) gap(cur, from);
          const to = Math.min(k.off + k.len, tEnd);
          hit(k, from, to);
          cur = to;
          i++;
        }
        if (s.n === 0) this.trees.delete(t);
      }
      if (cur < tEnd) gap(cur, tEnd);
      cur = tEnd;
      t++;
    }
  }

  /** The keys (or pieces of keys) that remain of a fill's placeholder in [off, off+len). */
  placeholderPieces(token: FillToken, off: number, len: number): IndexKey[] {
    const out: IndexKey[] = [];
    const end = off + len;
    for (let t = Math.floor(off / SUBTREE_SIZE); t * SUBTREE_SIZE < end; t++) {
      const s = this.trees.get(t);
      if (!s) continue;
      const base = t * SUBTREE_SIZE;
      const w = s.words;
      for (let i = KeyIndex.firstEndingAfter(s, Math.max(0, off - base)); i < s.n && base + w[i * STRIDE + OFF]! < end; i++) {
        const p = i * STRIDE;
        if (w[p + FLAGS_GEN_HI]! & KEY_FLAG_EMPTY && genOf(w, p) === token.id) out.push({ ...keyAt(s, i, base), fill: token });
      }
    }
    return out;
  }

  /** Remove the key equal to `key` (same range, flags, position and generation or fill), if it is still there. */
  remove(key: IndexKey): boolean {
    const t = Math.floor(key.off / SUBTREE_SIZE);
    const s = this.trees.get(t);
    if (!s) return false;
    const base = t * SUBTREE_SIZE;
    const i = KeyIndex.firstEndingAfter(s, key.off - base);
    if (i >= s.n) return false;
    const k = keyAt(s, i, base);
    const same =
      k.off === key.off &&
      k.len === key.len &&
      k.flags === key.flags &&
      (key.fill ? k.fill?.id === key.fill.id : k.seg === key.seg && k.segOff === key.segOff && k.gen === key.gen);
    if (!same) return false;
    KeyIndex.cut(s, i, 1);
    if (s.n === 0) this.trees.delete(t);
    this.count--;
    return true;
  }

  /** Drop every key for which `drop` is true (the background clean-up of stale keys). */
  sweep(drop: (k: IndexKey) => boolean): number {
    let dropped = 0;
    for (const [t, s] of this.trees) {
      const base = t * SUBTREE_SIZE;
      const w = s.words;
      let kept = 0;
      for (let i = 0; i < s.n; i++) {
        if (drop(keyAt(s, i, base))) continue;
        if (kept !== i) w.copyWithin(kept * STRIDE, i * STRIDE, i * STRIDE + STRIDE);
        kept++;
      }
      dropped += s.n - kept;
      s.n = kept;
      if (kept === 0) this.trees.delete(t);
    }
    this.count -= dropped;
    return dropped;
  }

  /** Every key in backing order (tests and tools). */
  *all(): IterableIterator<IndexKey> {
    const ts = [...this.trees.keys()].sort((a, b) => a - b);
    for (const t of ts) {
      const s = this.trees.get(t)!;
      for (let i = 0; i < s.n; i++) yield keyAt(s, i, t * SUBTREE_SIZE);
    }
  }
}
