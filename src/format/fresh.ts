import { cacheFlags, encodeCacheInfo, GC_PERCENT_DEFAULT, type CacheMode } from './cache-info.js';
import { FormatError } from './errors.js';
import {
  CACHE_INFO_SIZE,
  cacheInfoOffset,
  dataOffset,
  dirtyTailOffset,
  GEN_SIZE,
  genOffset,
  keyTailOffset,
  KSET_HEADER_SIZE,
  MIN_CACHE_DEV_SIZE,
  MAX_SEGMENTS,
  POS_SIZE,
  SB_OFF,
  SEG_INFO_SIZE,
  segInfoOffset,
  segmentsFor,
} from './layout.js';
import { encodePosition } from './position.js';
import { encodeGen, encodeSegmentInfo, segInfoFlags } from './segment.js';
import { encodeSuperblock } from './superblock.js';

export interface FormatOptions {
  dataCrc: boolean;
  mode: CacheMode;
  gcPercent: number;
}

export const DEFAULT_FORMAT_OPTIONS: FormatOptions = { dataCrc: false, mode: 'writeback', gcPercent: GC_PERCENT_DEFAULT };

export interface MediaWrite {
  offset: number;
  data: Buffer;
}

/**
 * The writes that lay out a fresh cache exactly as dm-pcache does on first use. Every slot that
 * the kernel leaves empty is written as zeros, so a re-format never leaves an older record that
 * would outrank the fresh one under the two-slot rule.
 */
export function freshFormat(deviceSize: number, opts: FormatOptions): MediaWrite[] | FormatError {
  if (deviceSize < MIN_CACHE_DEV_SIZE) {
    return new FormatError('device-too-small', `cache device is too small, required at least ${MIN_CACHE_DEV_SIZE}`);
  }
  const segNum = Math.min(segmentsFor(deviceSize), MAX_SEGMENTS);
  const writes: MediaWrite[] = [];
  writes.push({ offset: SB_OFF, data: encodeSuperblock(segNum) });
  const flags = cacheFlags({ dataCrc: opts.dataCrc, initDone: true, mode: opts.mode, gcPercent: opts.gcPercent });
  writes.push({ offset: cacheInfoOffset(0), data: Buffer.alloc(CACHE_INFO_SIZE) });
  writes.push({ offset: cacheInfoOffset(1), data: encodeCacheInfo({ seq: 1, segId: 0, nSegs: segNum, flags }) });
  // Positions write the current slot first, so the fresh record sits in slot 0.
  const origin = encodePosition({ seq: 1, seg: 0, off: 0 });
  writes.push({ offset: keyTailOffset(0), data: origin });
  writes.push({ offset: keyTailOffset(1), data: Buffer.alloc(POS_SIZE) });
  writes.push({ offset: dirtyTailOffset(0), data: origin });
  writes.push({ offset: dirtyTailOffset(1), data: Buffer.alloc(POS_SIZE) });
  const lonely = encodeSegmentInfo({ seq: 1, flags: segInfoFlags(false), nextSeg: 0 });
  const gen0 = encodeGen({ seq: 1, gen: 0 });
  const zeroInfo = Buffer.alloc(SEG_INFO_SIZE);
  const zeroGen = Buffer.alloc(GEN_SIZE);
  for (let s = 0; s < segNum; s++) {
    // The kernel writes each segment's info once unlinked (slot 1, seq 1), then links it to the
    // next one (slot 0, seq 2); the last segment is never linked.
    const linked = s + 1 < segNum ? encodeSegmentInfo({ seq: 2, flags: segInfoFlags(true), nextSeg: s + 1 }) : zeroInfo;
    writes.push({ offset: segInfoOffset(s, 0), data: linked });
    writes.push({ offset: segInfoOffset(s, 1), data: lonely });
    writes.push({ offset: genOffset(s, 0), data: zeroGen });
    writes.push({ offset: genOffset(s, 1), data: gen0 });
  }
  writes.push({ offset: dataOffset(0, 0), data: Buffer.alloc(KSET_HEADER_SIZE) });
  return writes;
}
