import { pcacheCrc } from './crc.js';
import { FormatError, type Decoded } from './errors.js';
import { MAX_SEGMENTS, SB_MAGIC, SB_SIZE, segmentsFor } from './layout.js';
import { hex32 } from './meta.js';

export interface Superblock {
  flags: number;
  segNum: number;
}

export const SB_FLAG_BIG_ENDIAN = 1;

export function encodeSuperblock(segNum: number): Buffer {
  const buf = Buffer.alloc(SB_SIZE);
  buf.writeUInt32LE(0, 4);
  buf.writeBigUInt64LE(SB_MAGIC, 8);
  buf.writeUInt32LE(segNum, 16);
  buf.writeUInt32LE(0, 20);
  buf.writeUInt32LE(pcacheCrc(buf.subarray(4)), 0);
  return buf;
}

/** The superblock's magic is 0: a device never formatted (or wiped). */
export function superblockBlank(buf: Buffer): boolean {
  return buf.length >= SB_SIZE && buf.readBigUInt64LE(8) === 0n;
}

/** Decode and validate the superblock against the size of the device it was read from. */
export function decodeSuperblock(buf: Buffer, deviceSize: number): Decoded<Superblock> {
  if (buf.length < SB_SIZE) return new FormatError('too-short', 'superblock: truncated');
  const magic = buf.readBigUInt64LE(8);
  if (magic !== SB_MAGIC) {
    return new FormatError('bad-magic', `superblock: bad magic 0x${magic.toString(16)}, expected 0x${SB_MAGIC.toString(16)}`);
  }
  const stored = buf.readUInt32LE(0);
  const crc = pcacheCrc(buf.subarray(4, SB_SIZE));
  if (stored !== crc) {
    return new FormatError('bad-crc', `superblock: crc mismatch (stored 0x${hex32(stored)}, computed 0x${hex32(crc)})`);
  }
  const flags = buf.readUInt32LE(4);
  if (flags & SB_FLAG_BIG_ENDIAN) {
    return new FormatError('bad-flags', 'superblock: formatted on a big-endian machine, not supported');
  }
  const segNum = buf.readUInt32LE(16);
  if (segNum === 0) return new FormatError('bad-seg-num', 'superblock: seg_num is 0');
  if (segNum > MAX_SEGMENTS) return new FormatError('bad-seg-num', `superblock: seg_num ${segNum} exceeds the maximum ${MAX_SEGMENTS}`);
  const fits = segmentsFor(deviceSize);
  if (segNum > fits) {
    return new FormatError('bad-seg-num', `superblock: seg_num ${segNum} is larger than the device holds (${fits})`);
  }
  return { flags, segNum };
}
