import { pcacheCrc } from './crc.js';
import { FormatError, type Decoded } from './errors.js';
import { decodeKeyAt, encodeKeyInto, type Key } from './key.js';
import { KEY_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC } from './layout.js';
import { hex32 } from './meta.js';

export const KSET_FLAG_LAST = 1n;

export interface KeysKset {
  last: false;
  keys: Key[];
  /** Bytes the kset occupies in the log. */
  size: number;
}

export interface LastKset {
  last: true;
  /** The cache segment where the log goes on, at offset 0. */
  nextSeg: number;
  size: number;
}

export type Kset = KeysKset | LastKset;

export function ksetSize(keyNum: number): number {
  return KSET_HEADER_SIZE + KEY_SIZE * keyNum;
}

/** Encode a normal kset. `trailer` extra zero bytes follow it, so the write also ends the log. */
export function encodeKset(keys: readonly Key[], trailer = 0): Buffer {
  if (keys.length === 0 || keys.length > KSET_KEYS_MAX) throw new RangeError(`a kset holds 1..${KSET_KEYS_MAX} keys, not ${keys.length}`);
  const size = ksetSize(keys.length);
  const buf = Buffer.alloc(size + trailer);
  buf.writeUInt32LE(keys.length, 4);
  buf.writeBigUInt64LE(KSET_MAGIC, 8);
  buf.writeBigUInt64LE(0n, 16);
  for (let i = 0; i < keys.length; i++) encodeKeyInto(keys[i]!, buf, KSET_HEADER_SIZE + i * KEY_SIZE);
  buf.writeUInt32LE(pcacheCrc(buf.subarray(4, size)), 0);
  return buf;
}

export function encodeLastKset(nextSeg: number): Buffer {
  const buf = Buffer.alloc(KSET_HEADER_SIZE);
  buf.writeUInt32LE(nextSeg >>> 0, 4);
  buf.writeBigUInt64LE(KSET_MAGIC, 8);
  buf.writeBigUInt64LE(KSET_FLAG_LAST, 16);
  buf.writeUInt32LE(pcacheCrc(buf.subarray(4)), 0);
  return buf;
}

/**
 * Decode the kset at the start of `buf`, which holds the bytes from the kset's position to the
 * end of its segment's data area (or at least KSET_MAX_SIZE of them). A 'bad-magic' error is the
 * ordinary end of the log; every other error is a damaged or forged kset. Keys are returned
 * unjudged: callers validate them with validateKey.
 */
export function decodeKset(buf: Buffer, nSegs: number): Decoded<Kset> {
  if (buf.length < KSET_HEADER_SIZE) return new FormatError('too-short', 'kset: no room for a kset header before the end of the segment');
  const magic = buf.readBigUInt64LE(8);
  if (magic !== KSET_MAGIC) return new FormatError('bad-magic', `kset: no kset magic (0x${magic.toString(16)})`);
  const flags = buf.readBigUInt64LE(16);
  const stored = buf.readUInt32LE(0);
  if (flags & KSET_FLAG_LAST) {
    const crc = pcacheCrc(buf.subarray(4, KSET_HEADER_SIZE));
    if (crc !== stored) return new FormatError('bad-crc', `kset: LAST kset crc mismatch (stored 0x${hex32(stored)}, computed 0x${hex32(crc)})`);
    if (flags !== KSET_FLAG_LAST) return new FormatError('bad-flags', `kset: unknown flags 0x${flags.toString(16)}`);
    const nextSeg = buf.readUInt32LE(4);
    if (nextSeg >= nSegs) return new FormatError('bad-segment', `kset: LAST kset names segment ${nextSeg}, not below n_segs ${nSegs}`);
    return { last: true, nextSeg, size: KSET_HEADER_SIZE };
  }
  const keyNum = buf.readUInt32LE(4);
  if (keyNum === 0 || keyNum > KSET_KEYS_MAX) return new FormatError('bad-key-num', `kset: key_num ${keyNum} is not within 1..${KSET_KEYS_MAX}`);
  const size = ksetSize(keyNum);
  if (size > buf.length) return new FormatError('bad-offset', `kset: ${keyNum} keys cross the end of the segment`);
  const crc = pcacheCrc(buf.subarray(4, size));
  if (crc !== stored) return new FormatError('bad-crc', `kset: crc mismatch (stored 0x${hex32(stored)}, computed 0x${hex32(crc)})`);
  if (flags !== 0n) return new FormatError('bad-flags', `kset: unknown flags 0x${flags.toString(16)}`);
  const keys: Key[] = new Array(keyNum);
  for (let i = 0; i < keyNum; i++) keys[i] = decodeKeyAt(buf, KSET_HEADER_SIZE + i * KEY_SIZE);
  return { last: false, keys, size };
}
