import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  CACHE_INFO_SIZE,
  CACHE_MODES,
  cacheFlags,
  decodeCacheInfo,
  decodeGen,
  decodeKeyAt,
  decodeKset,
  decodePosition,
  decodeSegmentInfo,
  decodeSuperblock,
  encodeCacheInfo,
  encodeGen,
  encodeKey,
  encodeKset,
  encodePosition,
  encodeSegmentInfo,
  encodeSuperblock,
  flagsDataCrc,
  flagsGcPercent,
  flagsInitDone,
  flagsMode,
  FormatError,
  GEN_SIZE,
  KEY_SIZE,
  KSET_KEYS_MAX,
  ksetSize,
  MAX_SEGMENTS,
  POS_SIZE,
  SB_SIZE,
  SEG_DATA_SIZE,
  SEG_INFO_SIZE,
  segInfoFlags,
  segInfoHasNext,
  segmentsFor,
  type Key,
} from '../../src/format/index.js';
import { seededRng, testSeed, type Rng } from '../helpers/rng.js';

const seed = testSeed('PCACHE_TEST_SEED');
const rng = seededRng(seed);
const ROUNDS = 300;

/** Any single changed byte must be caught: by the crc, or by a check that runs before it. */
function assertEveryFlipRejected(buf: Buffer, decode: (b: Buffer) => unknown, r: Rng): void {
  for (let i = 0; i < 8; i++) {
    const copy = Buffer.from(buf);
    const at = r.int(copy.length);
    copy[at] = copy[at]! ^ (1 + r.int(255));
    assert.ok(decode(copy) instanceof FormatError, `flip at ${at} of ${buf.toString('hex')} was accepted (seed ${seed})`);
  }
}

function randomKey(r: Rng): Key {
  return {
    off: r.int(2 ** 31) * 4096 + r.int(4096),
    len: 1 + r.int(0xffffffff),
    flags: r.int(4),
    seg: r.int(2 ** 32),
    segOff: r.int(2 ** 32),
    gen: r.int(2 ** 31) * 2 ** 21 + r.int(2 ** 21),
    dataCrc: r.int(2 ** 32),
  };
}

test(`superblock round trip (seed ${seed})`, () => {
  for (let i = 0; i < ROUNDS; i++) {
    const deviceSize = 512 * 1024 * 1024 + rng.int(2 ** 40);
    const segNum = 1 + rng.int(Math.min(segmentsFor(deviceSize), MAX_SEGMENTS));
    const buf = encodeSuperblock(segNum);
    assert.equal(buf.length, SB_SIZE);
    assert.deepEqual(decodeSuperblock(buf, deviceSize), { flags: 0, segNum });
    assertEveryFlipRejected(buf, (b) => decodeSuperblock(b, deviceSize), rng);
  }
});

test(`cache_info round trip with every flag (seed ${seed})`, () => {
  for (let i = 0; i < ROUNDS; i++) {
    const segNum = 1 + rng.int(MAX_SEGMENTS);
    const mode = CACHE_MODES[rng.int(CACHE_MODES.length)]!;
    const f = { dataCrc: rng.int(2) === 1, initDone: rng.int(2) === 1, mode, gcPercent: rng.int(91) };
    const info = { seq: rng.int(256), segId: rng.int(segNum), nSegs: 1 + rng.int(segNum), flags: cacheFlags(f) };
    const buf = encodeCacheInfo(info);
    assert.equal(buf.length, CACHE_INFO_SIZE);
    assert.deepEqual(decodeCacheInfo(buf, segNum), info);
    assert.deepEqual(
      { dataCrc: flagsDataCrc(info.flags), initDone: flagsInitDone(info.flags), mode: flagsMode(info.flags), gcPercent: flagsGcPercent(info.flags) },
      f,
    );
    assertEveryFlipRejected(buf, (b) => decodeCacheInfo(b, segNum), rng);
  }
  // The kernel's fresh flags: data_crc, init_done, writeback, gc 70.
  assert.equal(cacheFlags({ dataCrc: true, initDone: true, mode: 'writeback', gcPercent: 70 }), 0x1183);
});

test(`position, segment_info and generation round trips (seed ${seed})`, () => {
  for (let i = 0; i < ROUNDS; i++) {
    const nSegs = 1 + rng.int(MAX_SEGMENTS);
    const pos = { seq: rng.int(256), seg: rng.int(nSegs), off: rng.int(SEG_DATA_SIZE) };
    const pbuf = encodePosition(pos);
    assert.equal(pbuf.length, POS_SIZE);
    assert.deepEqual(decodePosition(pbuf, nSegs, 'key_tail'), pos);
    assertEveryFlipRejected(pbuf, (b) => decodePosition(b, nSegs, 'key_tail'), rng);

    const hasNext = rng.int(2) === 1;
    const si = { seq: rng.int(256), flags: segInfoFlags(hasNext), nextSeg: hasNext ? rng.int(nSegs) : 0 };
    const sbuf = encodeSegmentInfo(si);
    assert.equal(sbuf.length, SEG_INFO_SIZE);
    const back = decodeSegmentInfo(sbuf, nSegs);
    assert.deepEqual(back, si);
    assert.equal(segInfoHasNext(back as typeof si), hasNext);
    assertEveryFlipRejected(sbuf, (b) => decodeSegmentInfo(b, nSegs), rng);

    const gen = { seq: rng.int(256), gen: rng.int(2 ** 32) * 2 ** 21 + rng.int(2 ** 21) };
    const gbuf = encodeGen(gen);
    assert.equal(gbuf.length, GEN_SIZE);
    assert.deepEqual(decodeGen(gbuf), gen);
    assertEveryFlipRejected(gbuf, (b) => decodeGen(b), rng);
  }
});

test(`key and kset round trips (seed ${seed})`, () => {
  for (let i = 0; i < ROUNDS; i++) {
    const key = randomKey(rng);
    const kbuf = encodeKey(key);
    assert.equal(kbuf.length, KEY_SIZE);
    assert.deepEqual(decodeKeyAt(kbuf, 0), key);
  }
  for (let i = 0; i < 60; i++) {
    const n = i === 0 ? KSET_KEYS_MAX : 1 + rng.int(KSET_KEYS_MAX);
    const keys = Array.from({ length: n }, () => randomKey(rng));
    const buf = encodeKset(keys, 24);
    assert.equal(buf.length, ksetSize(n) + 24);
    assert.ok(buf.subarray(ksetSize(n)).every((b) => b === 0), 'the trailer ends the log');
    const nSegs = 1 + rng.int(100);
    assert.deepEqual(decodeKset(buf, nSegs), { last: false, keys, size: ksetSize(n) });
    assertEveryFlipRejected(buf.subarray(0, ksetSize(n)), (b) => decodeKset(b, nSegs), rng);
  }
  assert.throws(() => encodeKset([]), RangeError);
  assert.throws(() => encodeKset(Array.from({ length: KSET_KEYS_MAX + 1 }, () => randomKey(rng))), RangeError);
});

test('64-bit key fields: exact up to 2^53 - 1 against BigInt, clamped above so validateKey refuses them', () => {
  const cases: Array<[bigint, number]> = [
    [0n, 0],
    [0xffff_ffffn, 0xffff_ffff],
    [0x1_0000_0000n, 2 ** 32],
    [0x1f_ffff_ffff_ffffn, Number.MAX_SAFE_INTEGER],
    [0x20_0000_0000_0000n, Number.MAX_SAFE_INTEGER],
    [0xffff_ffff_ffff_ffffn, Number.MAX_SAFE_INTEGER],
  ];
  for (const [raw, want] of cases) {
    const buf = encodeKey({ off: 0, len: 512, flags: 0, seg: 1, segOff: 0, gen: 0, dataCrc: 0 });
    buf.writeBigUInt64LE(raw, 0);
    buf.writeBigUInt64LE(raw, 24);
    const k = decodeKeyAt(buf, 0);
    assert.equal(k.off, want, `off 0x${raw.toString(16)}`);
    assert.equal(k.gen, want, `gen 0x${raw.toString(16)}`);
    if (raw < 0x20_0000_0000_0000n) {
      const again = encodeKey(k);
      assert.equal(again.readBigUInt64LE(0), raw, `off 0x${raw.toString(16)} encodes back`);
      assert.equal(again.readBigUInt64LE(24), raw, `gen 0x${raw.toString(16)} encodes back`);
    }
  }
});
