/**
 * Cache images with a real log, built with the codec: formatted, with data in several segments,
 * ksets in two log segments joined by a LAST kset, a dirty_tail inside the log and one stale key.
 * Tests damage them and expect `checkCache` to notice.
 */
import assert from 'node:assert/strict';
import { formatCache } from '../../src/cache/format.js';
import {
  dataOffset,
  encodeGen,
  encodeKset,
  encodeLastKset,
  encodePosition,
  dirtyTailOffset,
  FormatError,
  genOffset,
  KEY_FLAG_CLEAN,
  KSET_FLAG_LAST,
  KSET_HEADER_SIZE,
  KEY_SIZE,
  MiB,
  pcacheCrc,
  type Key,
  type Position,
} from '../../src/format/index.js';
import type { Medium } from '../../src/media/medium.js';
import { seededRng } from './rng.js';

export interface LoggedKset {
  pos: Position;
  /** Byte offset on the device. */
  offset: number;
  size: number;
  /** null for the LAST kset. */
  keys: Key[] | null;
  nextSeg?: number;
}

export interface LoggedImage {
  medium: Medium;
  ksets: LoggedKset[];
  dirtyTail: Position;
  keyHead: Position;
  /** The stale key: its segment's generation moved on, and its data_crc is deliberately wrong. */
  stale: { kset: number; key: number };
  /** What checkCache must report for the intact image. */
  expect: {
    ksets: number;
    lastKsets: number;
    keys: number;
    staleKeys: number;
    cleanKeys: number;
    dirtyKeys: number;
    dirtyBytes: number;
    usedSegments: number;
    logBytes: number;
  };
}

type KeySpec = Omit<Key, 'dataCrc' | 'gen' | 'flags'> & { clean?: boolean; gen?: number; badCrc?: boolean };

/** Log segments and data segments used by the image; a fresh format maps cache segment i to physical i. */
export const LOG_SEGS = [0, 5] as const;
export const STALE_SEG = 4;

export async function buildLoggedImage(medium: Medium, opts: { dataCrc?: boolean; seed?: number } = {}): Promise<LoggedImage> {
  const dataCrc = opts.dataCrc ?? true;
  const fmt = await formatCache(medium, { dataCrc });
  assert.ok(!(fmt instanceof FormatError), String(fmt));
  const rng = seededRng(opts.seed ?? 1);

  const writeKeys = async (specs: KeySpec[]): Promise<Key[]> => {
    const keys: Key[] = [];
    for (const s of specs) {
      const data = rng.bytes(s.len);
      await medium.write(data, dataOffset(s.seg, s.segOff));
      const crc = s.badCrc ? (pcacheCrc(data) ^ 0x5a5a5a5a) >>> 0 : pcacheCrc(data);
      keys.push({
        off: s.off,
        len: s.len,
        flags: s.clean ? KEY_FLAG_CLEAN : 0,
        seg: s.seg,
        segOff: s.segOff,
        gen: s.gen ?? 0,
        dataCrc: dataCrc ? crc : 0,
      });
    }
    return keys;
  };

  const a = await writeKeys([
    { off: 0, len: 4096, seg: 1, segOff: 0 },
    { off: 8192, len: 8192, seg: 1, segOff: 4096 },
    { off: 1 * MiB, len: 65536, seg: 1, segOff: 12288, clean: true },
  ]);
  const b = await writeKeys([
    { off: 4 * MiB, len: 16384, seg: 2, segOff: 0 },
    { off: 5 * MiB, len: 4096, seg: 2, segOff: 16384, clean: true },
  ]);
  const c = await writeKeys([
    { off: 8 * MiB, len: 12288, seg: 3, segOff: 0 },
    { off: 12 * MiB, len: 4096, seg: STALE_SEG, segOff: 0, badCrc: true },
    { off: 16 * MiB, len: 4096, seg: 3, segOff: 12288 },
  ]);

  const ksets: LoggedKset[] = [];
  let off = 0;
  for (const keys of [a, b]) {
    const buf = encodeKset(keys, KSET_HEADER_SIZE);
    const size = buf.length - KSET_HEADER_SIZE;
    ksets.push({ pos: { seg: 0, off }, offset: dataOffset(0, off), size, keys });
    await medium.write(buf, dataOffset(0, off));
    off += size;
  }
  // As the kernel does: the new log segment's head is zeroed before the LAST kset points to it.
  await medium.write(Buffer.alloc(KSET_HEADER_SIZE), dataOffset(LOG_SEGS[1], 0));
  await medium.write(encodeLastKset(LOG_SEGS[1]), dataOffset(0, off));
  ksets.push({ pos: { seg: 0, off }, offset: dataOffset(0, off), size: KSET_HEADER_SIZE, keys: null, nextSeg: LOG_SEGS[1] });
  const cBuf = encodeKset(c, KSET_HEADER_SIZE);
  await medium.write(cBuf, dataOffset(LOG_SEGS[1], 0));
  ksets.push({ pos: { seg: LOG_SEGS[1], off: 0 }, offset: dataOffset(LOG_SEGS[1], 0), size: cBuf.length - KSET_HEADER_SIZE, keys: c });

  // Segment 4 was freed and reused once: its generation is 1, so C's key into it (gen 0) is stale.
  await medium.write(encodeGen({ seq: 2, gen: 1 }), genOffset(STALE_SEG, 0));
  const dirtyTail = ksets[1]!.pos;
  await medium.write(encodePosition({ seq: 2, ...dirtyTail }), dirtyTailOffset(1));
  await medium.sync();

  const logBytes = ksets.reduce((n, k) => n + k.size, 0);
  return {
    medium,
    ksets,
    dirtyTail,
    keyHead: { seg: LOG_SEGS[1], off: ksets[3]!.size },
    stale: { kset: 3, key: 1 },
    expect: {
      ksets: 4,
      lastKsets: 1,
      keys: 8,
      staleKeys: 1,
      cleanKeys: 2,
      dirtyKeys: 3,
      dirtyBytes: 16384 + 12288 + 4096,
      usedSegments: 5,
      logBytes,
    },
  };
}

/** Byte offset of key `i` of a kset. */
export function keyOffset(kset: LoggedKset, i: number): number {
  return kset.offset + KSET_HEADER_SIZE + i * KEY_SIZE;
}

export async function readBytes(medium: Medium, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await medium.read(buf, offset);
  return buf;
}

/**
 * Recompute the crc of the kset at `offset` over what its header now claims (even an impossible
 * key_num), so that a forged kset passes the crc check and reaches the structural ones.
 */
export async function resealKset(medium: Medium, offset: number): Promise<void> {
  const head = await readBytes(medium, offset, KSET_HEADER_SIZE);
  const last = (head.readBigUInt64LE(16) & KSET_FLAG_LAST) !== 0n;
  const len = last ? KSET_HEADER_SIZE : KSET_HEADER_SIZE + KEY_SIZE * head.readUInt32LE(4);
  const room = Math.min(len, medium.size() - offset);
  const body = await readBytes(medium, offset, room);
  const crc = Buffer.alloc(4);
  crc.writeUInt32LE(pcacheCrc(body.subarray(4)));
  await medium.write(crc, offset);
}

/** Recompute the crc of a two-slot record (bytes 4..size). */
export async function resealMeta(medium: Medium, offset: number, size: number): Promise<void> {
  const body = await readBytes(medium, offset, size);
  const crc = Buffer.alloc(4);
  crc.writeUInt32LE(pcacheCrc(body.subarray(4)));
  await medium.write(crc, offset);
}
