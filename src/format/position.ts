import { FormatError, type Decoded } from './errors.js';
import { POS_SIZE, SEG_DATA_SIZE } from './layout.js';
import { openMeta, sealMeta } from './meta.js';

/** A place in the log: an offset inside a cache segment's data area. */
export interface Position {
  seg: number;
  off: number;
}

export interface PositionRecord extends Position {
  seq: number;
}

export function encodePosition(rec: PositionRecord): Buffer {
  const buf = Buffer.alloc(POS_SIZE);
  buf.writeUInt32LE(rec.seg >>> 0, 8);
  buf.writeUInt32LE(rec.off >>> 0, 12);
  return sealMeta(buf, rec.seq);
}

/** Decode one slot of key_tail or dirty_tail; the position must name a segment and stay inside its data area. */
export function decodePosition(buf: Buffer, nSegs: number, what: string): Decoded<PositionRecord> {
  const seq = openMeta(buf, POS_SIZE, what);
  if (seq instanceof FormatError) return seq;
  const seg = buf.readUInt32LE(8);
  const off = buf.readUInt32LE(12);
  if (seg >= nSegs) return new FormatError('bad-segment', `${what}: segment ${seg} is not below n_segs ${nSegs}`);
  if (off >= SEG_DATA_SIZE) return new FormatError('bad-offset', `${what}: offset ${off} is past the data area (${SEG_DATA_SIZE})`);
  return { seq, seg, off };
}

export function formatPosition(p: Position): string {
  return `${p.seg}:${p.off}`;
}

export function samePosition(a: Position, b: Position): boolean {
  return a.seg === b.seg && a.off === b.off;
}
