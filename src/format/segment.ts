import { FormatError, type Decoded } from './errors.js';
import { GEN_SIZE, SEG_INFO_SIZE } from './layout.js';
import { openMeta, sealMeta } from './meta.js';

export const SEG_FLAG_HAS_NEXT = 1 << 0;
const SEG_TYPE_SHIFT = 1;
const SEG_TYPE_MASK = 0xf << SEG_TYPE_SHIFT;
export const SEG_TYPE_CACHE_DATA = 1;

export interface SegmentInfo {
  seq: number;
  flags: number;
  nextSeg: number;
}

export interface GenRecord {
  seq: number;
  gen: number;
}

export function segInfoFlags(hasNext: boolean, type = SEG_TYPE_CACHE_DATA): number {
  return (hasNext ? SEG_FLAG_HAS_NEXT : 0) | ((type << SEG_TYPE_SHIFT) & SEG_TYPE_MASK);
}

export function segInfoHasNext(info: SegmentInfo): boolean {
  return (info.flags & SEG_FLAG_HAS_NEXT) !== 0;
}

export function segInfoType(info: SegmentInfo): number {
  return (info.flags & SEG_TYPE_MASK) >>> SEG_TYPE_SHIFT;
}

export function encodeSegmentInfo(info: SegmentInfo): Buffer {
  const buf = Buffer.alloc(SEG_INFO_SIZE);
  buf.writeUInt32LE(info.flags >>> 0, 8);
  buf.writeUInt32LE(info.nextSeg >>> 0, 12);
  return sealMeta(buf, info.seq);
}

export function decodeSegmentInfo(buf: Buffer, segNum: number, what = 'segment_info'): Decoded<SegmentInfo> {
  const seq = openMeta(buf, SEG_INFO_SIZE, what);
  if (seq instanceof FormatError) return seq;
  const flags = buf.readUInt32LE(8);
  const nextSeg = buf.readUInt32LE(12);
  const info = { seq, flags, nextSeg };
  if (segInfoHasNext(info) && nextSeg >= segNum) {
    return new FormatError('bad-chain', `${what}: next segment ${nextSeg} is not below seg_num ${segNum}`);
  }
  return info;
}

export function encodeGen(rec: GenRecord): Buffer {
  const buf = Buffer.alloc(GEN_SIZE);
  buf.writeBigUInt64LE(BigInt(rec.gen), 8);
  return sealMeta(buf, rec.seq);
}

export function decodeGen(buf: Buffer, what = 'generation'): Decoded<GenRecord> {
  const seq = openMeta(buf, GEN_SIZE, what);
  if (seq instanceof FormatError) return seq;
  const gen = buf.readBigUInt64LE(8);
  if (gen > BigInt(Number.MAX_SAFE_INTEGER)) return new FormatError('bad-key', `${what}: generation ${gen} is out of range`);
  return { seq, gen: Number(gen) };
}
