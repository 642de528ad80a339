import { FormatError } from './errors.js';
import { KEY_SIZE, SEG_DATA_SIZE, SUBTREE_SIZE } from './layout.js';

export const KEY_FLAG_EMPTY = 1 << 0;
export const KEY_FLAG_CLEAN = 1 << 1;

/** A cached extent: `len` bytes of the backing device at `off`, held at `seg:segOff` of the cache. */
export interface Key {
  off: number;
  len: number;
  flags: number;
  seg: number;
  segOff: number;
  /** The segment's generation when the data was written; lower than the segment's now = stale. */
  gen: number;
  dataCrc: number;
}

export function encodeKeyInto(key: Key, buf: Buffer, at: number): void {
  writeU64(buf, key.off, at);
  buf.writeUInt32LE(key.len >>> 0, at + 8);
  buf.writeUInt32LE(key.flags >>> 0, at + 12);
  buf.writeUInt32LE(key.seg >>> 0, at + 16);
  buf.writeUInt32LE(key.segOff >>> 0, at + 20);
  writeU64(buf, key.gen, at + 24);
  buf.writeUInt32LE(key.dataCrc >>> 0, at + 32);
  buf.writeUInt32LE(0, at + 36);
}

export function encodeKey(key: Key): Buffer {
  const buf = Buffer.alloc(KEY_SIZE);
  encodeKeyInto(key, buf, 0);
  return buf;
}

/**
 * Decode a key without judging it. Offsets and generations above 2^53 are clamped to a value
 * that validateKey rejects, so no caller ever does arithmetic on an imprecise number.
 */
export function decodeKeyAt(buf: Buffer, at: number): Key {
  return {
    off: readU64Clamped(buf, at),
    len: buf.readUInt32LE(at + 8),
    flags: buf.readUInt32LE(at + 12),
    seg: buf.readUInt32LE(at + 16),
    segOff: buf.readUInt32LE(at + 20),
    gen: readU64Clamped(buf, at + 24),
    dataCrc: buf.readUInt32LE(at + 32),
  };
}

const TWO32 = 2 ** 32;
/** High words at or above this make a u64 above Number.MAX_SAFE_INTEGER (2^53 - 1). */
const UNSAFE_HIGH = 2 ** 21;

/** A little-endian u64 as a number, clamped to Number.MAX_SAFE_INTEGER; no BigInt on the replay path. */
function readU64Clamped(buf: Buffer, at: number): number {
  const high = buf.readUInt32LE(at + 4);
  return high >= UNSAFE_HIGH ? Number.MAX_SAFE_INTEGER : high * TWO32 + buf.readUInt32LE(at);
}

/** A non-negative integer up to 2^53 - 1 as a little-endian u64. */
function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32LE(value >>> 0, at);
  buf.writeUInt32LE(Math.floor(value / TWO32), at + 4);
}

export function describeKey(key: Key): string {
  return `key ${key.off}:${key.len} seg ${key.seg}:${key.segOff}`;
}

export interface KeyBounds {
  nSegs: number;
  /** The backing device's size, when known (offline tools may not know it). */
  backingSize?: number;
}

/** Bounds a key on media must respect (spec section 5); null when it does. */
export function validateKey(key: Key, bounds: KeyBounds): FormatError | null {
  // The common case is a good key: its description is built only for an error.
  if (
    key.len > 0 &&
    (key.flags & ~KEY_FLAG_CLEAN) === 0 &&
    key.seg < bounds.nSegs &&
    key.segOff < SEG_DATA_SIZE &&
    key.len <= SEG_DATA_SIZE - key.segOff &&
    key.gen < Number.MAX_SAFE_INTEGER &&
    key.off < Number.MAX_SAFE_INTEGER - key.len &&
    (bounds.backingSize === undefined || key.off + key.len <= bounds.backingSize) &&
    Math.floor(key.off / SUBTREE_SIZE) === Math.floor((key.off + key.len - 1) / SUBTREE_SIZE)
  ) {
    return null;
  }
  const what = describeKey(key);
  if (key.len === 0) return new FormatError('bad-key', `${what}: length is 0`);
  if (key.flags & KEY_FLAG_EMPTY) return new FormatError('bad-key', `${what}: an EMPTY placeholder is on media`);
  if (key.flags & ~(KEY_FLAG_EMPTY | KEY_FLAG_CLEAN)) return new FormatError('bad-key', `${what}: unknown flags 0x${key.flags.toString(16)}`);
  if (key.seg >= bounds.nSegs) return new FormatError('bad-segment', `${what}: segment ${key.seg} is not below n_segs ${bounds.nSegs}`);
  if (key.segOff >= SEG_DATA_SIZE || key.len > SEG_DATA_SIZE - key.segOff) {
    return new FormatError('bad-key', `${what}: data crosses the end of its segment's data area`);
  }
  if (key.gen >= Number.MAX_SAFE_INTEGER) return new FormatError('bad-key', `${what}: generation out of range`);
  if (key.off >= Number.MAX_SAFE_INTEGER - key.len) return new FormatError('bad-key', `${what}: offset out of range`);
  if (bounds.backingSize !== undefined && key.off + key.len > bounds.backingSize) {
    return new FormatError('bad-key', `${what}: extends past the backing device (${bounds.backingSize} bytes)`);
  }
  if (Math.floor(key.off / SUBTREE_SIZE) !== Math.floor((key.off + key.len - 1) / SUBTREE_SIZE)) {
    return new FormatError('bad-key', `${what}: crosses a 4 MiB boundary of the backing device`);
  }
  return null;
}
