import { SEG_DATA_SIZE } from '../format/index.js';
import type { Segments } from './segments.js';

/** Space handed out at the data head for one key's data; the key's segment reference is taken. */
export interface Extent {
  seg: number;
  segOff: number;
  len: number;
  gen: number;
}

/**
 * Where new data goes: the rest of one segment, then a fresh one. The head holds a reference on
 * its segment so that GC never frees it while it is being filled.
 */
export class DataHead {
  private seg = -1;
  private off = 0;

  constructor(private readonly segments: Segments) {}

  /**
   * Up to `want` bytes at the head, never crossing the segment's end; null when a new segment is
   * needed and fewer than `reserve` + 1 are free (the log keeps a reserve so it can always move on).
   */
  tryAlloc(want: number, reserve: number): Extent | null {
    if (this.seg < 0) {
      const seg = this.segments.allocate(reserve);
      if (seg === null) return null;
      this.segments.get(seg);
      this.seg = seg;
      this.off = 0;
    }
    const seg = this.seg;
    const len = Math.min(want, SEG_DATA_SIZE - this.off);
    const ext: Extent = { seg, segOff: this.off, len, gen: this.segments.gens[seg]! };
    this.segments.get(seg);
    this.off += len;
    if (this.off >= SEG_DATA_SIZE) {
      this.seg = -1;
      this.segments.put(seg);
    }
    return ext;
  }

  /**
   * Leave `seg` if it is the head's segment (a write there failed for space): the next extent
   * comes from another segment. The head's reference goes; the segment retires once its keys do.
   */
  abandon(seg: number): void {
    if (this.seg !== seg) return;
    this.seg = -1;
    this.segments.put(seg);
  }

  get position(): { seg: number; off: number } | null {
    return this.seg < 0 ? null : { seg: this.seg, off: this.off };
  }
}
