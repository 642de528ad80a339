import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  decodeCacheInfo,
  decodeGen,
  decodeKeyAt,
  decodeKset,
  decodePosition,
  decodeSegmentInfo,
  decodeSuperblock,
  FormatError,
  KSET_MAGIC,
  KSET_MAX_SIZE,
  pcacheCrc,
  SB_MAGIC,
  validateKey,
} from '../../src/format/index.js';
import { seededRng, testSeed } from '../helpers/rng.js';

const seed = testSeed('PCACHE_TEST_SEED');
const rng = seededRng(seed);

/** Random bytes, sometimes dressed up to get past the first checks (magic, crc) into the deeper ones. */
function candidate(len: number, magic: bigint | null, sealTo: number | null): Buffer {
  const b = rng.bytes(len);
  const mode = rng.int(4);
  if (magic !== null && mode >= 1 && len >= 16) b.writeBigUInt64LE(magic, 8);
  if (magic === KSET_MAGIC && mode >= 2 && len >= 24) {
    b.writeUInt32LE(rng.int(3) === 0 ? rng.int(2 ** 32) : rng.int(140), 4);
    b.writeBigUInt64LE(BigInt(rng.int(3)), 16);
  }
  if (mode >= 2 && len >= 8) {
    let end = sealTo ?? len;
    if (magic === KSET_MAGIC && len >= 24) {
      const n = b.readUInt32LE(4);
      end = b.readBigUInt64LE(16) === 1n ? 24 : Math.min(len, 24 + 40 * n);
    }
    if (end <= len) b.writeUInt32LE(pcacheCrc(b.subarray(4, end)), 0);
  }
  return b;
}

test(`decoders return a value or a FormatError for any bytes, never throw (seed ${seed})`, () => {
  const seen = new Set<string>();
  const note = (r: unknown): void => void seen.add(r instanceof FormatError ? r.problem : 'ok');
  for (let i = 0; i < 3000; i++) {
    const small = rng.int(40);
    const segNum = rng.int(3) === 0 ? rng.int(2 ** 32) : 1 + rng.int(64);
    const size = rng.int(2) ? rng.int(2 ** 40) : rng.int(2 ** 31);
    note(decodeSuperblock(candidate(small, SB_MAGIC, 24), size));
    note(decodeCacheInfo(candidate(small, null, 24), segNum));
    note(decodePosition(candidate(small, null, 16), segNum, 'key_tail'));
    note(decodeSegmentInfo(candidate(small, null, 16), segNum));
    note(decodeGen(candidate(small, null, 16)));
    const kset = candidate(rng.int(2) ? rng.int(KSET_MAX_SIZE + 100) : rng.int(200), KSET_MAGIC, null);
    const k = decodeKset(kset, segNum);
    note(k);
    if (!(k instanceof FormatError) && !k.last) {
      for (const key of k.keys) validateKey(key, { nSegs: segNum, backingSize: rng.int(2) ? undefined : rng.int(2 ** 40) });
    }
    const raw = rng.bytes(40 + rng.int(40));
    const key = decodeKeyAt(raw, rng.int(raw.length - 39));
    assert.ok(Number.isSafeInteger(key.off) && Number.isSafeInteger(key.gen));
    validateKey(key, { nSegs: segNum });
  }
  // The dressing reached the deep checks, not only the crc.
  for (const p of ['ok', 'bad-crc', 'bad-magic', 'too-short', 'bad-key-num', 'bad-seg-num']) assert.ok(seen.has(p), `never saw ${p}`);
});
