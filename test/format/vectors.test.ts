import assert from 'node:assert/strict';
import { test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import {
  decodeKset,
  decodeSuperblock,
  encodeLastKset,
  encodeSuperblock,
  FormatError,
  PCACHE_CRC_SEED,
  pcacheCrc,
  segmentsFor,
} from '../../src/format/index.js';

const GiB = 1024 * 1024 * 1024;

test('CRC: the spec vectors, as a raw update from the seed 0x3B15A', () => {
  assert.equal(PCACHE_CRC_SEED, 0x3b15a);
  assert.equal(pcacheCrc(Buffer.from('123456789')), 0xe5868ab2);
  assert.equal(pcacheCrc(Buffer.alloc(4096)), 0x603571b1);
  // The standard CRC32C of the same bytes differs: no inversions, and a different start.
  assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
});

test('CRC: feeding in pieces equals feeding at once, and no bytes leave the seed', () => {
  const data = Buffer.from('the quick brown fox jumps over the lazy dog');
  for (let cut = 0; cut <= data.length; cut++) {
    assert.equal(pcacheCrc(data.subarray(cut), pcacheCrc(data.subarray(0, cut))), pcacheCrc(data));
  }
  assert.equal(pcacheCrc(Buffer.alloc(0)), PCACHE_CRC_SEED);
});

test('superblock: the spec bytes for a 1 GiB device (seg_num 63)', () => {
  assert.equal(segmentsFor(GiB), 63);
  const sb = encodeSuperblock(63);
  assert.equal(sb.toString('hex'), 'db127f0900000000ef96c596fa5eb0653f00000000000000');
  assert.deepEqual(decodeSuperblock(sb, GiB), { flags: 0, segNum: 63 });
});

test('kset: the spec bytes of a LAST kset naming segment 5', () => {
  const last = encodeLastKset(5);
  assert.equal(last.toString('hex'), 'a5c21759050000001a4f164ea69468670100000000000000');
  const decoded = decodeKset(last, 6);
  assert.deepEqual(decoded, { last: true, nextSeg: 5, size: 24 });
  // The same bytes on a cache of only 5 segments name a segment that does not exist.
  const bad = decodeKset(last, 5);
  assert.ok(bad instanceof FormatError);
  assert.equal(bad.problem, 'bad-segment');
});
