import assert from 'node:assert/strict';
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { checkCache, type CheckReport } from '../../src/cache/check.js';
import { dumpCache } from '../../src/cache/dump.js';
import {
  cacheInfoOffset,
  dataOffset,
  dirtyTailOffset,
  encodeCacheInfo,
  encodeLastKset,
  encodePosition,
  encodeSegmentInfo,
  encodeSuperblock,
  keyTailOffset,
  KSET_HEADER_SIZE,
  MAX_SEGMENTS,
  MiB,
  SB_OFF,
  SEG_DATA_SIZE,
  segInfoFlags,
  segInfoOffset,
} from '../../src/format/index.js';
import { openFileMedium } from '../../src/media/file.js';
import type { Medium } from '../../src/media/medium.js';
import { MemoryMedium } from '../../src/media/memory.js';
import { runPcache } from '../helpers/cli.js';
import { buildLoggedImage, keyOffset, readBytes, resealKset, type LoggedImage } from '../helpers/image.js';
import { BoundsWatch } from '../helpers/media.js';
import { tempDir } from '../helpers/tmp.js';

const DEV_SIZE = 512 * MiB;

async function xorByte(m: Medium, offset: number, mask = 0x20): Promise<void> {
  const b = await readBytes(m, offset, 1);
  b[0] = b[0]! ^ mask;
  await m.write(b, offset);
}

async function putU32(m: Medium, offset: number, value: number): Promise<void> {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(value >>> 0);
  await m.write(b, offset);
}

async function putU64(m: Medium, offset: number, value: bigint): Promise<void> {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  await m.write(b, offset);
}

/** Rewrite a field of key `i` of kset `k` (byte `field` within the 40-byte key) and reseal the kset. */
async function forgeKey(img: LoggedImage, k: number, i: number, field: number, value: number): Promise<void> {
  const kset = img.ksets[k]!;
  await putU32(img.medium, keyOffset(kset, i) + field, value);
  await resealKset(img.medium, kset.offset);
}

async function linkBothSlots(m: Medium, phys: number, next: number): Promise<void> {
  await m.write(encodeSegmentInfo({ seq: 2, flags: segInfoFlags(true), nextSeg: next }), segInfoOffset(phys, 0));
  await m.write(encodeSegmentInfo({ seq: 3, flags: segInfoFlags(true), nextSeg: next }), segInfoOffset(phys, 1));
}

interface Damage {
  name: string;
  damage: (img: LoggedImage) => Promise<void>;
  expect: RegExp;
  backingSize?: number;
}

const DAMAGES: Damage[] = [
  { name: 'bad superblock magic', damage: (img) => xorByte(img.medium, SB_OFF + 8), expect: /superblock: bad magic/ },
  { name: 'bad superblock crc', damage: (img) => xorByte(img.medium, SB_OFF + 20), expect: /superblock: crc mismatch/ },
  {
    name: 'seg_num larger than the device holds',
    damage: (img) => img.medium.write(encodeSuperblock(32), SB_OFF),
    expect: /seg_num 32 is larger than the device holds \(31\)/,
  },
  { name: 'seg_num 0', damage: (img) => img.medium.write(encodeSuperblock(0), SB_OFF), expect: /seg_num is 0/ },
  {
    name: 'seg_num above the format maximum',
    damage: (img) => img.medium.write(encodeSuperblock(MAX_SEGMENTS + 1), SB_OFF),
    expect: /exceeds the maximum/,
  },
  {
    name: 'both cache_info slots bad',
    damage: async (img) => {
      await xorByte(img.medium, cacheInfoOffset(1) + 12);
      await img.medium.write(Buffer.from('not a cache_info record'), cacheInfoOffset(0));
    },
    expect: /cache_info: no valid slot/,
  },
  {
    name: 'cache_info n_segs above seg_num',
    damage: async (img) => {
      await img.medium.write(encodeCacheInfo({ seq: 2, segId: 0, nSegs: 32, flags: 0x1183 }), cacheInfoOffset(0));
      await xorByte(img.medium, cacheInfoOffset(1) + 12);
    },
    expect: /n_segs 32 is not within 1\.\.31/,
  },
  {
    name: 'a chain link past n_segs',
    damage: (img) => linkBothSlots(img.medium, 3, 999),
    expect: /next segment 999 is not below seg_num 31/,
  },
  { name: 'a cycle in the segment chain', damage: (img) => linkBothSlots(img.medium, 3, 1), expect: /segment chain: cycle/ },
  {
    name: 'a chain that ends early',
    damage: (img) => img.medium.write(encodeSegmentInfo({ seq: 3, flags: segInfoFlags(false), nextSeg: 0 }), segInfoOffset(3, 0)),
    expect: /segment chain: ends after 4 of 31 segments/,
  },
  {
    name: 'a tail offset past the data area',
    damage: (img) => img.medium.write(encodePosition({ seq: 1, seg: 0, off: SEG_DATA_SIZE }), keyTailOffset(0)),
    expect: /key_tail: offset 16764928 is past the data area/,
  },
  {
    name: 'dirty_tail inside a kset',
    damage: (img) => img.medium.write(encodePosition({ seq: 3, seg: 0, off: 100 }), dirtyTailOffset(0)),
    expect: /dirty_tail 0:100 is not at a kset of the log/,
  },
  {
    name: 'dirty_tail before key_tail',
    damage: (img) => img.medium.write(encodePosition({ seq: 2, ...img.ksets[3]!.pos }), keyTailOffset(1)),
    expect: /dirty_tail 0:144 is not at a kset of the log between key_tail 5:0/,
  },
  {
    name: 'a kset with key_num 129 (crc recomputed)',
    damage: async (img) => {
      await putU32(img.medium, img.ksets[0]!.offset + 4, 129);
      await resealKset(img.medium, img.ksets[0]!.offset);
    },
    expect: /log at 0:0: kset: key_num 129 is not within 1\.\.128/,
  },
  {
    name: "a key crossing its segment's end (crc recomputed)",
    damage: (img) => forgeKey(img, 0, 0, 20, SEG_DATA_SIZE - 1024),
    expect: /kset at 0:0 key 0: key 0:4096 seg 1:16763904: data crosses the end of its segment's data area/,
  },
  {
    name: 'a key in a segment past n_segs (crc recomputed)',
    damage: (img) => forgeKey(img, 1, 1, 16, 99),
    expect: /kset at 0:144 key 1: .*segment 99 is not below n_segs 31/,
  },
  { name: 'a key of length 0 (crc recomputed)', damage: (img) => forgeKey(img, 3, 2, 8, 0), expect: /kset at 5:0 key 2: .*length is 0/ },
  {
    name: 'a key past the backing device',
    damage: async () => {},
    backingSize: 16 * MiB,
    expect: /kset at 5:0 key 2: key 16777216:4096 .*extends past the backing device \(16777216 bytes\)/,
  },
  {
    name: 'a kset with unknown flags (crc recomputed)',
    damage: async (img) => {
      await putU64(img.medium, img.ksets[1]!.offset + 16, 2n);
      await resealKset(img.medium, img.ksets[1]!.offset);
    },
    expect: /log at 0:144: kset: unknown flags 0x2/,
  },
  {
    name: 'a LAST kset naming a segment past n_segs (crc recomputed)',
    damage: async (img) => {
      await putU32(img.medium, img.ksets[2]!.offset + 4, 40);
      await resealKset(img.medium, img.ksets[2]!.offset);
    },
    expect: /log at 0:248: kset: LAST kset names segment 40, not below n_segs 31/,
  },
  {
    name: 'a cycle of LAST ksets',
    damage: (img) => img.medium.write(encodeLastKset(0), dataOffset(5, img.ksets[3]!.size)),
    expect: /log at 5:144: log: LAST kset at 5:144 leads back to segment 0 \(a cycle\)/,
  },
  {
    name: "a key's data that does not match its data_crc",
    damage: (img) => xorByte(img.medium, dataOffset(1, 4096 + 777)),
    expect: /kset at 0:0 key 1: key 8192:8192 seg 1:4096: data_crc mismatch/,
  },
  {
    name: 'a kset that runs off the end of its segment',
    damage: async (img) => {
      const at = dataOffset(5, SEG_DATA_SIZE - 64);
      // Both tails near the end of segment 5, where a kset header claims more keys than fit.
      await img.medium.write(encodePosition({ seq: 2, seg: 5, off: SEG_DATA_SIZE - 64 }), keyTailOffset(1));
      await img.medium.write(encodePosition({ seq: 3, seg: 5, off: SEG_DATA_SIZE - 64 }), dirtyTailOffset(0));
      const head = Buffer.alloc(KSET_HEADER_SIZE);
      head.writeUInt32LE(2, 4);
      head.writeBigUInt64LE(0x676894a64e164f1an, 8);
      await img.medium.write(head, at);
    },
    expect: /log at 5:16764864: kset: 2 keys cross the end of the segment/,
  },
];

async function freshImage(): Promise<LoggedImage> {
  return buildLoggedImage(new MemoryMedium(DEV_SIZE));
}

async function checkWatched(m: Medium, backingSize?: number): Promise<CheckReport> {
  const watch = new BoundsWatch(m);
  const report = await checkCache(watch, { backingSize });
  assert.deepEqual(watch.violations, [], 'no access outside the device');
  return report;
}

test('the intact image is clean and every count is as built', async () => {
  const img = await freshImage();
  const r = await checkWatched(img.medium, 64 * MiB);
  assert.deepEqual(r.problems, []);
  assert.deepEqual(r.warnings, []);
  assert.equal(r.clean, true);
  const { ksets, lastKsets, keys, staleKeys, cleanKeys, dirtyKeys, dirtyBytes, usedSegments, logBytes } = r;
  assert.deepEqual({ ksets, lastKsets, keys, staleKeys, cleanKeys, dirtyKeys, dirtyBytes, usedSegments, logBytes }, img.expect);
  assert.equal(r.dataCrcVerified, img.expect.keys - img.expect.staleKeys, "every live key's data checked; the stale one skipped");
  assert.deepEqual(r.keyHead, img.keyHead);
  assert.deepEqual(r.dirtyTail, img.dirtyTail);
  assert.deepEqual(r.keyTail, { seg: 0, off: 0 });
});

test(`the corruption table: ${DAMAGES.length} damages, each named, none throws`, async () => {
  assert.ok(DAMAGES.length >= 12);
  for (const d of DAMAGES) {
    const img = await freshImage();
    await d.damage(img);
    const r = await checkWatched(img.medium, d.backingSize);
    assert.equal(r.clean, false, `${d.name}: reported clean`);
    assert.ok(
      r.problems.some((p) => d.expect.test(p)),
      `${d.name}: no problem matches ${d.expect}; got ${JSON.stringify(r.problems)}`,
    );
    assert.ok(!r.problems.some((p) => /check stopped/.test(p)), `${d.name}: ${r.problems.join('; ')}`);
    // dump shows what it can of the same damage, without throwing either.
    const dump = await dumpCache(new BoundsWatch(img.medium));
    assert.ok(dump.superblock !== null);
  }
});

test('harmless leftovers are warnings, not problems', async () => {
  // A torn kset write at the end of the log (valid magic, bad crc) just ends the log.
  let img = await freshImage();
  await xorByte(img.medium, keyOffset(img.ksets[3]!, 0) + 3);
  let r = await checkWatched(img.medium);
  assert.deepEqual(r.problems, []);
  assert.equal(r.clean, true);
  assert.deepEqual(r.keyHead, img.ksets[3]!.pos);
  assert.match(r.warnings.join('\n'), /log ends at a damaged kset at 5:0: possibly a torn write/);
  assert.equal(r.ksets, 3);

  // A torn two-slot update leaves the other slot, which wins.
  img = await freshImage();
  await img.medium.write(Buffer.from('torn torn torn t'), dirtyTailOffset(0));
  await xorByte(img.medium, segInfoOffset(7, 1) + 9);
  r = await checkWatched(img.medium);
  assert.equal(r.clean, true, r.problems.join('; '));
  assert.equal(r.warnings.length, 2, r.warnings.join('\n'));
  assert.match(r.warnings.join('\n'), /dirty_tail slot 0: dirty_tail: crc mismatch/);
  assert.match(r.warnings.join('\n'), /segment_info of physical segment 7 slot 1/);
  assert.deepEqual(r.dirtyTail, img.dirtyTail);
});

test('a damaged kset inside the log is a problem, not a torn write: what follows would be lost', async () => {
  const img = await freshImage();
  await xorByte(img.medium, keyOffset(img.ksets[0]!, 1) + 2);
  const r = await checkWatched(img.medium);
  assert.equal(r.clean, false);
  const all = r.problems.join('\n');
  assert.match(all, /log at 0:0: kset: crc mismatch .*yet a valid kset follows at 0:144/);
  assert.match(all, /dirty_tail 0:144 is not at a kset of the log between key_tail 0:0 and key_head 0:0/);
  assert.deepEqual(r.warnings, []);
});

test('through the CLI: damaged images fail check with each problem named; dump still works', async () => {
  const dir = await tempDir();
  const byName = (prefix: string): Damage => DAMAGES.find((d) => d.name.startsWith(prefix))!;
  const cases = [byName('bad superblock magic'), byName('a kset with key_num 129'), byName('a cycle of LAST'), byName("a key's data")];
  const paths: string[] = [];
  for (const [i, d] of cases.entries()) {
    const path = join(dir, `damaged-${i}.img`);
    await writeFile(path, '');
    await truncate(path, DEV_SIZE);
    const m = await openFileMedium(path, { lock: false });
    try {
      await d.damage(await buildLoggedImage(m));
    } finally {
      await m.close();
    }
    paths.push(path);
  }
  const texts = await Promise.all(paths.map((p) => runPcache(['check', p])));
  for (const [i, d] of cases.entries()) {
    const text = texts[i]!;
    assert.equal(text.code, 1, `${d.name}: ${text.stderr}`);
    assert.match(text.stdout, new RegExp(`problem: .*${d.expect.source}`), d.name);
    assert.match(text.stderr, /^pcache: .*: \d+ problems? found/);
    assert.doesNotMatch(text.stderr, /^\s+at /m);
  }
  const magic = await runPcache(['check', '--json', paths[0]!]);
  assert.equal(magic.code, 1);
  const report = JSON.parse(magic.stdout) as CheckReport;
  assert.equal(report.clean, false);
  assert.match(report.problems[0]!, /magic/);

  const dump = await runPcache(['dump', paths[2]!]);
  assert.equal(dump.code, 0, dump.stderr);
  assert.match(dump.stdout, /LAST: the log goes on at 5:0/);
  const bad = await runPcache(['dump', paths[0]!]);
  assert.equal(bad.code, 1);
  assert.match(bad.stdout, /superblock .*invalid: superblock: bad magic/);
});
