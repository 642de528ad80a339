import {
  dataOffset,
  decodeKset,
  FormatError,
  formatPosition,
  KSET_MAX_SIZE,
  SEG_DATA_SIZE,
  type Decoded,
  type Kset,
  type Position,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';

/** Read and decode the kset at `pos` (its keys unjudged). */
export async function readKset(medium: Medium, physOf: readonly number[], pos: Position): Promise<Decoded<Kset>> {
  const room = SEG_DATA_SIZE - pos.off;
  const buf = Buffer.allocUnsafe(Math.min(KSET_MAX_SIZE, room));
  await medium.read(buf, dataOffset(physOf[pos.seg]!, pos.off));
  return decodeKset(buf, physOf.length);
}

export interface LogEnd {
  /** Where the log ends: the position of the first invalid kset (key_head). */
  head: Position;
  /** Why it ends there: 'bad-magic' is the ordinary end; anything else is damage. */
  reason: FormatError;
  /** Cache segments the log occupies, in log order. */
  segments: number[];
}

/**
 * Walk the log from `from`, following LAST ksets, until the first kset that does not decode.
 * `visit` sees every kset with its position; returning false stops the walk there. A LAST kset
 * that leads back into a segment the walk already passed ends the walk as a cycle.
 */
export async function walkLog(
  medium: Medium,
  physOf: readonly number[],
  from: Position,
  visit: (pos: Position, kset: Kset) => boolean | void | Promise<boolean | void>,
): Promise<LogEnd> {
  const pos = { seg: from.seg, off: from.off };
  const segments = [pos.seg];
  const seen = new Set<number>(segments);
  for (;;) {
    const kset = await readKset(medium, physOf, pos);
    if (kset instanceof FormatError) return { head: pos, reason: kset, segments };
    if (kset.last) {
      if (seen.has(kset.nextSeg)) {
        return {
          head: pos,
          reason: new FormatError('bad-chain', `log: LAST kset at ${formatPosition(pos)} leads back to segment ${kset.nextSeg} (a cycle)`),
          segments,
        };
      }
    }
    if ((await visit({ seg: pos.seg, off: pos.off }, kset)) === false) return { head: pos, reason: new FormatError('bad-magic', 'stopped'), segments };
    if (kset.last) {
      pos.seg = kset.nextSeg;
      pos.off = 0;
      seen.add(pos.seg);
      segments.push(pos.seg);
    } else {
      pos.off += kset.size;
    }
  }
}
