import { pcacheCrc } from './crc.js';
import { FormatError, type Decoded } from './errors.js';
import { META_HEADER_SIZE } from './layout.js';

/** The 8-byte header of every two-slot record: crc, seq, version, reserved. */
export interface MetaHeader {
  seq: number;
}

/** Seal a record: write seq and version, then the crc over bytes 4..end. */
export function sealMeta(buf: Buffer, seq: number): Buffer {
  buf.writeUInt8(seq & 0xff, 4);
  buf.writeUInt8(0, 5);
  buf.writeUInt16LE(0, 6);
  buf.writeUInt32LE(pcacheCrc(buf.subarray(4)), 0);
  return buf;
}

/** Check a record's length and crc and return its seq; `what` names it in errors. */
export function openMeta(buf: Buffer, size: number, what: string): Decoded<number> {
  if (buf.length < size) return new FormatError('too-short', `${what}: record is truncated`);
  const rec = buf.subarray(0, size);
  const stored = rec.readUInt32LE(0);
  const crc = pcacheCrc(rec.subarray(4));
  if (stored !== crc) {
    return new FormatError('bad-crc', `${what}: crc mismatch (stored 0x${hex32(stored)}, computed 0x${hex32(crc)})`);
  }
  return rec.readUInt8(4);
}

/** Is seq `a` after `b` in the wrapping 8-bit sense? */
export function seqAfter(a: number, b: number): boolean {
  return ((a - b) << 24) >> 24 > 0;
}

export interface SlotChoice<T> {
  /** The slot that holds the newest valid record. */
  slot: 0 | 1;
  value: T;
}

/** The two-slot load rule: drop invalid slots, take the newer seq; null when neither is valid. */
export function pickSlot<T extends MetaHeader>(s0: Decoded<T>, s1: Decoded<T>): SlotChoice<T> | null {
  const ok0 = !(s0 instanceof FormatError);
  const ok1 = !(s1 instanceof FormatError);
  if (ok0 && ok1) return seqAfter((s1 as T).seq, (s0 as T).seq) ? { slot: 1, value: s1 as T } : { slot: 0, value: s0 as T };
  if (ok0) return { slot: 0, value: s0 as T };
  if (ok1) return { slot: 1, value: s1 as T };
  return null;
}

export function hex32(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

export { META_HEADER_SIZE };
