import { FormatError, type Decoded } from './errors.js';
import { CACHE_INFO_SIZE } from './layout.js';
import { openMeta, sealMeta } from './meta.js';

export const CACHE_FLAG_DATA_CRC = 1 << 0;
export const CACHE_FLAG_INIT_DONE = 1 << 1;
const MODE_SHIFT = 2;
const MODE_MASK = 0xf << MODE_SHIFT;
const GC_SHIFT = 6;
const GC_MASK = 0x7f << GC_SHIFT;

export const CACHE_MODES = ['writeback', 'writethrough', 'writearound', 'writeonly'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

export const GC_PERCENT_DEFAULT = 70;
export const GC_PERCENT_MAX = 90;

export interface CacheInfo {
  seq: number;
  /** Physical segment of cache segment 0. */
  segId: number;
  nSegs: number;
  flags: number;
}

export function cacheFlags(opts: { dataCrc: boolean; initDone: boolean; mode: CacheMode; gcPercent: number }): number {
  return (
    (opts.dataCrc ? CACHE_FLAG_DATA_CRC : 0) |
    (opts.initDone ? CACHE_FLAG_INIT_DONE : 0) |
    (CACHE_MODES.indexOf(opts.mode) << MODE_SHIFT) |
    ((opts.gcPercent << GC_SHIFT) & GC_MASK)
  );
}

export function flagsDataCrc(flags: number): boolean {
  return (flags & CACHE_FLAG_DATA_CRC) !== 0;
}
export function flagsInitDone(flags: number): boolean {
  return (flags & CACHE_FLAG_INIT_DONE) !== 0;
}
export function flagsModeIndex(flags: number): number {
  return (flags & MODE_MASK) >>> MODE_SHIFT;
}
export function flagsMode(flags: number): CacheMode | undefined {
  return CACHE_MODES[flagsModeIndex(flags)];
}
export function flagsGcPercent(flags: number): number {
  return (flags & GC_MASK) >>> GC_SHIFT;
}
export function withGcPercent(flags: number, gcPercent: number): number {
  return (flags & ~GC_MASK) | ((gcPercent << GC_SHIFT) & GC_MASK);
}

export function encodeCacheInfo(info: CacheInfo): Buffer {
  const buf = Buffer.alloc(CACHE_INFO_SIZE);
  buf.writeUInt32LE(info.segId >>> 0, 8);
  buf.writeUInt32LE(info.nSegs >>> 0, 12);
  buf.writeUInt32LE(info.flags >>> 0, 16);
  buf.writeUInt32LE(0, 20);
  return sealMeta(buf, info.seq);
}

/** Decode one slot; validates crc and that the segments it names exist (`segNum` from the superblock). */
export function decodeCacheInfo(buf: Buffer, segNum: number): Decoded<CacheInfo> {
  const seq = openMeta(buf, CACHE_INFO_SIZE, 'cache_info');
  if (seq instanceof FormatError) return seq;
  const segId = buf.readUInt32LE(8);
  const nSegs = buf.readUInt32LE(12);
  const flags = buf.readUInt32LE(16);
  if (nSegs === 0 || nSegs > segNum) return new FormatError('bad-seg-num', `cache_info: n_segs ${nSegs} is not within 1..${segNum}`);
  if (segId >= segNum) return new FormatError('bad-segment', `cache_info: seg_id ${segId} is not below seg_num ${segNum}`);
  if (flagsMode(flags) === undefined) return new FormatError('bad-flags', `cache_info: unknown cache mode ${flagsModeIndex(flags)}`);
  const gc = flagsGcPercent(flags);
  if (gc > 90) return new FormatError('bad-flags', `cache_info: gc_percent ${gc} is above 90`);
  return { seq, segId, nSegs, flags };
}
