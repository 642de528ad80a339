import { dataOffset, KEY_FLAG_CLEAN, KEY_FLAG_EMPTY, pcacheCrc } from '../format/index.js';
import type { CacheCore } from './core.js';
import { FILL_RESERVE } from './core.js';
import { ioError } from './errors.js';
import { isPlaceholder, type FillToken, type IndexKey } from './key-index.js';
import { commitKey } from './write.js';

let fillIds = 0;

export function isStale(core: CacheCore, k: IndexKey): boolean {
  return !isPlaceholder(k) && k.gen < core.segments.gens[k.seg]!;
}

/** Reads up to this size are carved from a shared slab, as Node's own pool does below 4 KiB. */
const SLAB_SIZE = 256 * 1024;
const SLAB_MAX = 64 * 1024;
let slab = Buffer.allocUnsafe(0);
let slabUsed = 0;

/**
 * A buffer for a read's result. 4 KiB is just too big for Buffer's pool, and giving each such read
 * its own ArrayBuffer costs more than the read itself; the slab lives until its last view dies.
 */
function readBuffer(len: number): Buffer {
  if (len > SLAB_MAX) return Buffer.allocUnsafe(len);
  if (slabUsed + len > slab.length) {
    slab = Buffer.allocUnsafeSlow(SLAB_SIZE);
    slabUsed = 0;
  }
  const out = slab.subarray(slabUsed, slabUsed + len);
  // Keep views 8-byte aligned, as the pool does.
  slabUsed = (slabUsed + len + 7) & ~7;
  return out;
}

interface Hit {
  dst: Buffer;
  seg: number;
  at: number;
}

async function readHit(core: CacheCore, h: Hit): Promise<void> {
  core.segments.pin(h.seg);
  try {
    await core.medium.read(h.dst, h.at);
  } catch (err) {
    throw ioError(err, 'cache device read failed');
  } finally {
    core.segments.unpin(h.seg);
  }
}

/**
 * The read path: hits are copied from the cache (their segments pinned so GC cannot reuse them
 * meanwhile); gaps are read from the backing device behind an EMPTY placeholder, and filled into
 * the cache afterwards, in the background, for whatever part of the placeholder no write replaced.
 * A gap gets no placeholder and no fill when its read stream is past the sequential cutoff or fill
 * work is behind (see fill.ts): the reply is the same either way.
 */
export async function readData(core: CacheCore, off: number, len: number): Promise<Buffer> {
  const out = readBuffer(len);
  const hits: Hit[] = [];
  const gaps: Array<{ from: number; to: number; fill: boolean }> = [];
  let staleDropped = 0;
  core.index.walk(
    off,
    len,
    (k) => {
      const stale = isStale(core, k);
      if (stale) staleDropped++;
      return stale;
    },
    (k, from, to) => {
      if (isPlaceholder(k)) {
        // Another read is filling this range: read the backing too, but leave the fill to it.
        gaps.push({ from, to, fill: false });
        return;
      }
      core.stats.readHitBytes += to - from;
      hits.push({ dst: out.subarray(from - off, to - off), seg: k.seg, at: dataOffset(core.physOf[k.seg]!, k.segOff + (from - k.off)) });
    },
    (from, to) => gaps.push({ from, to, fill: true }),
  );
  core.stats.staleKeysDropped += staleDropped;
  // Every read counts towards its stream, hits too: a stream that hits and then misses is still one stream.
  const pastCutoff = core.fills.beyondCutoff(off, len);
  if (gaps.length === 0) {
    core.stats.readHits++;
    // The common case, one key covering the whole read: no promise bookkeeping beyond the read.
    if (hits.length === 1) {
      await readHit(core, hits[0]!);
      return out;
    }
  } else {
    core.stats.readMisses++;
  }
  const io: Promise<void>[] = hits.map((h) => readHit(core, h));
  for (const g of gaps) {
    const gapLen = g.to - g.from;
    core.stats.readMissBytes += gapLen;
    const dst = out.subarray(g.from - off, g.to - off);
    let token: FillToken | undefined;
    if (g.fill && pastCutoff) {
      core.stats.sequentialSkippedBytes += gapLen;
    } else if (g.fill && !core.fills.admit(gapLen)) {
      core.stats.fillDroppedBytes += gapLen;
    } else if (g.fill) {
      token = { id: ++fillIds };
      core.index.insert({ off: g.from, len: gapLen, flags: KEY_FLAG_EMPTY, seg: 0, segOff: 0, gen: 0, fill: token });
    }
    io.push(
      core.backing.read(dst, g.from).then(
        () => {
          // The fill shares the reply's buffer: nothing writes to a read's result once it is read.
          if (token) core.track(core.fills.run(gapLen, () => fill(core, token, g.from, dst)));
        },
        (err) => {
          if (token) {
            core.fills.release(gapLen);
            dropPlaceholder(core, token, g.from, gapLen);
          }
          throw ioError(err, 'backing device read failed');
        },
      ),
    );
  }
  const results = await Promise.allSettled(io);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
  return out;
}

function dropPlaceholder(core: CacheCore, token: FillToken, off: number, len: number): void {
  for (const p of core.index.placeholderPieces(token, off, len)) core.index.remove(p);
}

/** Is [off, off+len) still wholly covered by one piece of the placeholder? */
function stillCovered(core: CacheCore, token: FillToken, off: number, len: number): boolean {
  const pieces = core.index.placeholderPieces(token, off, len);
  return pieces.length === 1 && pieces[0]!.off <= off && pieces[0]!.off + pieces[0]!.len >= off + len;
}

/** Write what is left of the placeholder into the cache as CLEAN keys. Best effort: never waits for space. */
async function fill(core: CacheCore, token: FillToken, from: number, data: Buffer): Promise<void> {
  try {
    for (const p of core.index.placeholderPieces(token, from, data.length)) {
      let pos = p.off;
      const end = p.off + p.len;
      while (pos < end) {
        const ext = core.head.tryAlloc(end - pos, FILL_RESERVE);
        if (!ext) return;
        const chunk = data.subarray(pos - from, pos - from + ext.len);
        try {
          await core.data.write(chunk, dataOffset(core.physOf[ext.seg]!, ext.segOff));
        } catch {
          core.segments.put(ext.seg);
          return;
        }
        if (stillCovered(core, token, pos, ext.len)) {
          commitKey(core, {
            off: pos,
            len: ext.len,
            flags: KEY_FLAG_CLEAN,
            seg: ext.seg,
            segOff: ext.segOff,
            gen: ext.gen,
            dataCrc: core.dataCrc ? pcacheCrc(chunk) : 0,
          });
          core.stats.fillBytes += ext.len;
        } else {
          // A write replaced part of the range meanwhile: its data wins, this copy is dropped.
          core.segments.put(ext.seg);
        }
        pos += ext.len;
      }
    }
  } finally {
    dropPlaceholder(core, token, from, data.length);
  }
}
