import { dataOffset, KEY_FLAG_CLEAN, pcacheCrc, SUBTREE_SIZE, type Key } from '../format/index.js';
import type { CacheCore } from './core.js';
import { LOG_RESERVE } from './core.js';
import type { Extent } from './data-head.js';
import { ioError, isNoSpace } from './errors.js';

/** Space at the data head; when there is none, wait for GC and write-back to free a segment. */
export async function allocWait(core: CacheCore, want: number): Promise<Extent> {
  let ext = core.head.tryAlloc(want, LOG_RESERVE);
  if (ext) return ext;
  core.stats.writesWaiting++;
  core.stats.spaceWaits++;
  try {
    // In turn with other waiting writers; a time-out as well as the wake-up: a lost wake-up costs
    // a short delay, never a hang.
    const wait = core.segments.spaceWait(250);
    while (!ext) {
      core.needSpace();
      await wait.next();
      ext = core.head.tryAlloc(want, LOG_RESERVE);
    }
  } finally {
    core.stats.writesWaiting--;
  }
  return ext;
}

/** Log one key whose data is in the cache: into the index first, then into the open kset. */
export function commitKey(core: CacheCore, key: Key): void {
  core.index.insert(key);
  core.log.append(key);
  if (!(key.flags & KEY_FLAG_CLEAN)) core.stats.dirtyBytes += key.len;
}

/**
 * The write path: split at 4 MiB boundaries of the backing device and at segment ends; for each
 * piece write the data at the data head, then (only then) index and log its key.
 */
export async function writeData(core: CacheCore, off: number, data: Buffer): Promise<void> {
  let done = 0;
  let noSpace = 0;
  while (done < data.length) {
    const pos = off + done;
    const want = Math.min(data.length - done, SUBTREE_SIZE - (pos % SUBTREE_SIZE));
    // Space is usually there: taking it without an await keeps requests that arrive together
    // next to each other at the data head, in arrival order (one vectored write, see DataWriter).
    const ext = core.head.tryAlloc(want, LOG_RESERVE) ?? (await allocWait(core, want));
    const chunk = data.subarray(done, done + ext.len);
    try {
      await core.data.write(chunk, dataOffset(core.physOf[ext.seg]!, ext.segOff));
    } catch (err) {
      core.segments.put(ext.seg);
      // A sparse cache file on a full filesystem: this segment's blocks cannot be had, but those
      // of segments written before can. Move on rather than fail every write in this segment.
      if (isNoSpace(err) && noSpace++ < core.segments.n) {
        core.head.abandon(ext.seg);
        core.segments.markNoBlocks(ext.seg);
        // Waiting for GC helps only if some segment holds data it can free (head and log aside).
        if (core.segments.canAllocate || core.segments.usedSegments - core.segments.retiring > 2) continue;
      }
      throw ioError(err, 'cache device write failed');
    }
    commitKey(core, {
      off: pos,
      len: ext.len,
      flags: 0,
      seg: ext.seg,
      segOff: ext.segOff,
      gen: ext.gen,
      dataCrc: core.dataCrc ? pcacheCrc(chunk) : 0,
    });
    done += ext.len;
  }
}

/**
 * Zeroes as keys (the format has no other way to say "zero" that keeps log order): every key
 * points into one shared extent of zeros in the cache, so a large TRIM costs keys, not space.
 */
export class Zeroer {
  private extent: Extent | null = null;
  /** Shared by every cache in the process (never written to): 4 MiB per open cost more than opening. */
  private static shared: Buffer | null = null;
  private readonly zeros = (Zeroer.shared ??= Buffer.alloc(SUBTREE_SIZE));
  private readonly crcs = new Map<number, number>();

  constructor(private readonly core: CacheCore) {}

  private crcOf(len: number): number {
    let c = this.crcs.get(len);
    if (c === undefined) {
      c = pcacheCrc(this.zeros.subarray(0, len));
      if (this.crcs.size < 1024) this.crcs.set(len, c);
    }
    return c;
  }

  /** A reference on the shared zero extent, or a new one written now. */
  private async zeroExtent(): Promise<Extent> {
    const { segments } = this.core;
    const z = this.extent;
    if (z && segments.isUsed(z.seg) && segments.gens[z.seg] === z.gen && segments.refsOf(z.seg) > 0) {
      segments.get(z.seg);
      return z;
    }
    const ext = await allocWait(this.core, SUBTREE_SIZE);
    try {
      await this.core.data.write(this.zeros.subarray(0, ext.len), dataOffset(this.core.physOf[ext.seg]!, ext.segOff));
    } catch (err) {
      segments.put(ext.seg);
      throw ioError(err, 'cache device write failed');
    }
    this.extent = ext;
    return ext;
  }

  async zero(off: number, len: number): Promise<void> {
    const end = off + len;
    let pos = off;
    while (pos < end) {
      const want = Math.min(end - pos, SUBTREE_SIZE - (pos % SUBTREE_SIZE));
      const z = await this.zeroExtent();
      const n = Math.min(want, z.len);
      commitKey(this.core, { off: pos, len: n, flags: 0, seg: z.seg, segOff: z.segOff, gen: z.gen, dataCrc: this.core.dataCrc ? this.crcOf(n) : 0 });
      pos += n;
    }
  }
}
