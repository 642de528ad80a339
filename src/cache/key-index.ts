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

function piece(k: IndexKey, off: number, end: number): IndexKey {
  const p: IndexKey = { off, len: end - off, flags: k.flags, seg: k.seg, segOff: k.segOff + (off - k.off), gen: k.gen };
  return k.fill ? { ...p, fill: k.fill } : p;
}

export function isPlaceholder(k: IndexKey): boolean {
  return (k.flags & KEY_FLAG_EMPTY) !== 0;
}

/**
 * The key tree: for each 4 MiB stretch of the backing device, its keys ordered by offset and never
 * overlapping. A newer key replaces whatever it overlaps: older keys are cut at the front, cut at
 * the back, split in two, or deleted. Keys never cross a 4 MiB boundary (the write path splits).
 */
export class KeyIndex {
  private readonly trees = new Map<number, IndexKey[]>();
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** First position in `arr` whose key ends after `off`. */
  private static firstEndingAfter(arr: readonly IndexKey[], off: number): number {
    let lo = 0;
    let hi = arr.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const k = arr[mid]!;
      if (k.off + k.len <= off) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  insert(key: IndexKey): void {
    const t = Math.floor(key.off / SUBTREE_SIZE);
    let arr = this.trees.get(t);
    if (!arr) {
      arr = [];
      this.trees.set(t, arr);
    }
    const end = key.off + key.len;
    const i = KeyIndex.firstEndingAfter(arr, key.off);
    let j = i;
    let front: IndexKey | undefined;
    let back: IndexKey | undefined;
    while (j < arr.length && arr[j]!.off < end) {
      const e = arr[j]!;
      const eEnd = e.off + e.len;
      if (e.off < key.off) front = piece(e, e.off, key.off);
      if (eEnd > end) back = piece(e, end, eEnd);
      j++;
    }
    const repl: IndexKey[] = [];
    if (front) repl.push(front);
    repl.push(key);
    if (back) repl.push(back);
    if (j - i === 1 && repl.length === 1) arr[i] = key;
    else arr.splice(i, j - i, ...repl);
    this.count += repl.length - (j - i);
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
      const tEnd = Math.min(end, (t + 1) * SUBTREE_SIZE);
      const arr = this.trees.get(t);
      if (arr) {
        let i = KeyIndex.firstEndingAfter(arr, cur);
        while (i < arr.length && arr[i]!.off < tEnd) {
          const k = arr[i]!;
          if (stale(k)) {
            arr.splice(i, 1);
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
        if (arr.length === 0) this.trees.delete(t);
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
      const arr = this.trees.get(t);
      if (!arr) continue;
      for (let i = KeyIndex.firstEndingAfter(arr, off); i < arr.length && arr[i]!.off < end; i++) {
        if (arr[i]!.fill === token) out.push(arr[i]!);
      }
    }
    return out;
  }

  /** Remove exactly this key object, if it is still in the index. */
  remove(key: IndexKey): boolean {
    const arr = this.trees.get(Math.floor(key.off / SUBTREE_SIZE));
    if (!arr) return false;
    const i = KeyIndex.firstEndingAfter(arr, key.off);
    if (arr[i] !== key) return false;
    arr.splice(i, 1);
    this.count--;
    return true;
  }

  /** Replace exactly this key object by another covering the same range, if it is still there. */
  replace(old: IndexKey, next: IndexKey): boolean {
    const arr = this.trees.get(Math.floor(old.off / SUBTREE_SIZE));
    if (!arr) return false;
    const i = KeyIndex.firstEndingAfter(arr, old.off);
    if (arr[i] !== old) return false;
    arr[i] = next;
    return true;
  }

  /** Drop every key for which `drop` is true (the background clean-up of stale keys). */
  sweep(drop: (k: IndexKey) => boolean): number {
    let dropped = 0;
    for (const [t, arr] of this.trees) {
      const kept = arr.filter((k) => !drop(k));
      if (kept.length !== arr.length) {
        dropped += arr.length - kept.length;
        if (kept.length) this.trees.set(t, kept);
        else this.trees.delete(t);
      }
    }
    this.count -= dropped;
    return dropped;
  }

  /** Every key in backing order (tests and tools). */
  *all(): IterableIterator<IndexKey> {
    const ts = [...this.trees.keys()].sort((a, b) => a - b);
    for (const t of ts) yield* this.trees.get(t)!;
  }
}
