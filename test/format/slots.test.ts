import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatCache } from '../../src/cache/format.js';
import { loadMeta } from '../../src/cache/meta.js';
import {
  cacheFlags,
  cacheInfoOffset,
  decodeCacheInfo,
  decodePosition,
  dirtyTailOffset,
  encodeCacheInfo,
  encodePosition,
  FormatError,
  keyTailOffset,
  pickSlot,
  seqAfter,
} from '../../src/format/index.js';
import { MemoryMedium } from '../../src/media/memory.js';

const MiB = 1024 * 1024;
const NSEGS = 31;

function pos(seq: number, seg: number, off: number): Buffer {
  return encodePosition({ seq, seg, off });
}

function corrupt(buf: Buffer): Buffer {
  const copy = Buffer.from(buf);
  copy[12] = copy[12]! ^ 0x40;
  return copy;
}

test('seqAfter compares as a signed 8-bit difference', () => {
  assert.ok(seqAfter(1, 0));
  assert.ok(seqAfter(0, 255), '0 follows 255 across the wrap');
  assert.ok(!seqAfter(255, 0));
  assert.ok(seqAfter(100, 0));
  assert.ok(!seqAfter(200, 0), '200 is 56 before 0, not 200 after it');
  assert.ok(!seqAfter(7, 7));
});

test('pickSlot: the newest valid slot wins, across wrap-around, in either slot', () => {
  const d = (b: Buffer) => decodePosition(b, NSEGS, 'key_tail');
  const wrapped = pickSlot(d(pos(255, 1, 100)), d(pos(0, 2, 200)));
  assert.equal(wrapped?.slot, 1);
  assert.deepEqual(wrapped?.value, { seq: 0, seg: 2, off: 200 });
  const reversed = pickSlot(d(pos(0, 2, 200)), d(pos(255, 1, 100)));
  assert.equal(reversed?.slot, 0);
  assert.equal(pickSlot(d(pos(4, 0, 0)), d(pos(3, 0, 8)))?.slot, 0);
  assert.equal(pickSlot(d(pos(3, 0, 0)), d(pos(4, 0, 8)))?.slot, 1);
});

test('pickSlot: a corrupt slot is ignored even when its seq is newer; none when both are bad', () => {
  const d = (b: Buffer) => decodePosition(b, NSEGS, 'dirty_tail');
  const older = pos(9, 1, 64);
  const newer = corrupt(pos(10, 3, 128));
  assert.ok(d(newer) instanceof FormatError);
  assert.deepEqual(pickSlot(d(older), d(newer)), { slot: 0, value: { seq: 9, seg: 1, off: 64 } });
  assert.deepEqual(pickSlot(d(newer), d(older)), { slot: 1, value: { seq: 9, seg: 1, off: 64 } });
  assert.equal(pickSlot(d(corrupt(older)), d(newer)), null);
  assert.equal(pickSlot(d(Buffer.alloc(16)), d(Buffer.alloc(16))), null, 'never written');
  // A valid crc over an impossible value is not a valid slot either.
  assert.equal(pickSlot(d(pos(1, NSEGS, 0)), d(Buffer.alloc(16))), null);

  const flags = cacheFlags({ dataCrc: false, initDone: true, mode: 'writeback', gcPercent: 70 });
  const ci = (seq: number) => decodeCacheInfo(encodeCacheInfo({ seq, segId: 0, nSegs: NSEGS, flags }), NSEGS);
  assert.equal(pickSlot(ci(255), ci(0))?.slot, 1);
  assert.equal(pickSlot(ci(0), decodeCacheInfo(corrupt(encodeCacheInfo({ seq: 1, segId: 0, nSegs: NSEGS, flags })), NSEGS))?.slot, 0);
});

test('loadMeta applies the same rule on a device: wrap-around, a torn slot, and both slots bad', async () => {
  const m = new MemoryMedium(512 * MiB);
  assert.ok(!((await formatCache(m)) instanceof FormatError));
  await m.write(pos(255, 2, 4096), keyTailOffset(0));
  await m.write(pos(0, 3, 8192), keyTailOffset(1));
  await m.write(corrupt(pos(2, 4, 0)), dirtyTailOffset(1));
  const meta = await loadMeta(m);
  assert.ok(!(meta instanceof FormatError), String(meta));
  assert.deepEqual(meta.keyTail, { seq: 0, seg: 3, off: 8192 });
  assert.deepEqual(meta.keyTailSlot, { slot: 1, seq: 0 });
  assert.deepEqual(meta.dirtyTail, { seq: 1, seg: 0, off: 0 }, 'the torn newer slot is ignored');
  assert.equal(meta.warnings.length, 1, 'the torn slot is reported as a warning');
  assert.match(meta.warnings[0]!, /dirty_tail slot 1/);

  await m.write(corrupt(await readSlot(m, cacheInfoOffset(1))), cacheInfoOffset(1));
  const none = await loadMeta(m);
  assert.ok(none instanceof FormatError);
  assert.match(none.message, /cache_info: no valid slot/);
});

async function readSlot(m: MemoryMedium, offset: number): Promise<Buffer> {
  const b = Buffer.alloc(24);
  await m.read(b, offset);
  return b;
}
