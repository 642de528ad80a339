import { dataOffset, KEY_FLAG_CLEAN, formatPosition, pcacheCrc, samePosition, validateKey, type Position } from '../format/index.js';
import type { Medium } from '../media/medium.js';
import { CacheError } from './errors.js';
import { KeyIndex } from './key-index.js';
import { walkLog } from './log.js';
import type { CacheMeta } from './meta.js';
import { Segments } from './segments.js';
import { dataCrcMessage } from './writeback.js';

export interface Replayed {
  segments: Segments;
  index: KeyIndex;
  keyHead: Position;
  ksets: number;
  keys: number;
  staleKeys: number;
  /** Bytes of dirty (not CLEAN) keys at or after dirty_tail. */
  dirtyBytes: number;
  /** Why the log ended where it did, when that was not the ordinary empty header. */
  endNote: string | null;
}

/**
 * Rebuild the in-memory state from the log (spec section 6, replay): read ksets from key_tail,
 * following LAST ksets, until the first invalid one; index every non-stale key, count segment
 * references, mark used segments. A key that breaks the format's bounds, or whose data fails its
 * CRC, refuses the cache, as dm-pcache does.
 */
export async function replay(medium: Medium, meta: CacheMeta, backingSize: number, dataCrc: boolean): Promise<Replayed> {
  const segments = new Segments(medium, meta.physOf, meta.gens, meta.genSlots);
  const index = new KeyIndex();
  const nSegs = meta.physOf.length;
  let ksets = 0;
  let keys = 0;
  let staleKeys = 0;
  let sawDirtyTail = false;
  let dirtyBytes = 0;
  const crcBuf = dataCrc ? Buffer.allocUnsafe(4 * 1024 * 1024) : null;
  const end = await walkLog(medium, meta.physOf, meta.keyTail, async (pos, kset) => {
    if (samePosition(pos, meta.dirtyTail)) sawDirtyTail = true;
    if (kset.last) return;
    ksets++;
    for (const key of kset.keys) {
      const bad = validateKey(key, { nSegs, backingSize });
      if (bad) throw new CacheError(`failed to replay keys: kset at ${formatPosition(pos)}: ${bad.message}`, 'EIO');
      if (key.gen < segments.gens[key.seg]!) {
        staleKeys++;
        continue;
      }
      if (crcBuf) {
        const data = key.len <= crcBuf.length ? crcBuf.subarray(0, key.len) : Buffer.allocUnsafe(key.len);
        await medium.read(data, dataOffset(meta.physOf[key.seg]!, key.segOff));
        const crc = pcacheCrc(data);
        if (crc !== key.dataCrc) throw new CacheError(`failed to replay keys: ${dataCrcMessage(key, crc)}`, 'EIO');
      }
      if (sawDirtyTail && !(key.flags & KEY_FLAG_CLEAN)) dirtyBytes += key.len;
      segments.markUsed(key.seg);
      segments.get(key.seg);
      index.insert({ off: key.off, len: key.len, flags: key.flags, seg: key.seg, segOff: key.segOff, gen: key.gen });
      keys++;
    }
  });
  if (samePosition(end.head, meta.dirtyTail)) sawDirtyTail = true;
  if (!sawDirtyTail) {
    throw new CacheError(
      `dirty_tail ${formatPosition(meta.dirtyTail)} is not in the log from key_tail ${formatPosition(meta.keyTail)} to ${formatPosition(end.head)}`,
      'EIO',
    );
  }
  for (const s of end.segments) segments.markUsed(s);
  const endNote = end.reason.problem === 'bad-magic' ? null : `log ends at ${formatPosition(end.head)}: ${end.reason.message}`;
  return { segments, index, keyHead: end.head, ksets, keys, staleKeys, dirtyBytes, endNote };
}
