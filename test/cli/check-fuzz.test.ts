import assert from 'node:assert/strict';
import { test } from 'node:test';
import { checkCache } from '../../src/cache/check.js';
import {
  CACHE_CTRL_OFF,
  cacheInfoOffset,
  dataOffset,
  genOffset,
  KEY_SIZE,
  KSET_HEADER_SIZE,
  MiB,
  SB_OFF,
  segInfoOffset,
} from '../../src/format/index.js';
import { buildLoggedImage, resealKset, resealMeta, type LoggedImage } from '../helpers/image.js';
import { BoundsWatch, SparseMedium } from '../helpers/media.js';
import { seededRng, testSeed, type Rng } from '../helpers/rng.js';

const FLIPS = 10_000;
const seed = testSeed('PCACHE_FUZZ_SEED');

interface Region {
  what: string;
  offset: number;
  length: number;
  /** How to make the crc match the damaged bytes again, so deeper checks see them. */
  reseal?: (m: SparseMedium) => Promise<void>;
}

/** Where flips land: every metadata record, every kset, and the key data, with the record's own reseal. */
function regions(img: LoggedImage): { meta: Region[]; log: Region[]; data: Region[] } {
  const meta: Region[] = [{ what: 'superblock', offset: SB_OFF, length: 24, reseal: (m) => resealMeta(m, SB_OFF, 24) }];
  for (const slot of [0, 1]) {
    const at = cacheInfoOffset(slot);
    meta.push({ what: `cache_info ${slot}`, offset: at, length: 24, reseal: (m) => resealMeta(m, at, 24) });
  }
  for (let i = 0; i < 4; i++) {
    const at = CACHE_CTRL_OFF + 16 * i;
    meta.push({ what: `cache_ctrl ${i}`, offset: at, length: 16, reseal: (m) => resealMeta(m, at, 16) });
  }
  for (let s = 0; s < 8; s++) {
    for (const slot of [0, 1]) {
      const si = segInfoOffset(s, slot);
      const gen = genOffset(s, slot);
      meta.push({ what: `segment_info ${s}/${slot}`, offset: si, length: 16, reseal: (m) => resealMeta(m, si, 16) });
      meta.push({ what: `generation ${s}/${slot}`, offset: gen, length: 16, reseal: (m) => resealMeta(m, gen, 16) });
    }
  }
  const log: Region[] = img.ksets.map((k, i) => ({
    what: `kset ${i}`,
    offset: k.offset,
    length: k.size + KSET_HEADER_SIZE,
    reseal: async (m) => {
      // Reseal only a size that a kset can have: a forged key_num of millions is the decoder's job.
      const head = Buffer.alloc(KSET_HEADER_SIZE);
      await m.read(head, k.offset);
      if (head.readUInt32LE(4) <= 200) await resealKset(m, k.offset);
    },
  }));
  log.push({ what: 'log tail of segment 0', offset: dataOffset(0, 272), length: 2048 });
  const data: Region[] = [];
  for (const k of img.ksets) for (const key of k.keys ?? []) data.push({ what: `data of key ${key.off}`, offset: dataOffset(key.seg, key.segOff), length: key.len });
  return { meta, log, data };
}

function pick<T>(rng: Rng, items: readonly T[]): T {
  return items[rng.int(items.length)]!;
}

test(`fuzz: ${FLIPS} random byte flips; check never throws, hangs or reads out of bounds (seed ${seed})`, async (t) => {
  t.diagnostic(`seed ${seed} (replay with PCACHE_FUZZ_SEED=${seed})`);
  console.log(`check fuzz seed ${seed}`);
  const medium = new SparseMedium(512 * MiB, 'fuzz');
  const img = await buildLoggedImage(medium);
  const baseline = await checkCache(medium);
  assert.equal(baseline.clean, true, baseline.problems.join('; '));
  const { meta, log, data } = regions(img);
  const rng = seededRng(seed);
  let clean = 0;
  const kinds = new Set<string>();
  const start = Date.now();

  for (let i = 0; i < FLIPS; i++) {
    const roll = rng.next();
    let region: Region;
    if (roll < 0.35) region = pick(rng, meta);
    else if (roll < 0.8) region = pick(rng, log);
    else if (roll < 0.9) region = pick(rng, data);
    else {
      const at = rng.int(medium.size());
      region = { what: 'anywhere', offset: at, length: 1 };
    }
    const saved = Buffer.alloc(region.length);
    medium.readSync(saved, region.offset);
    const flips = rng.next() < 0.15 ? 2 + rng.int(3) : 1;
    const what: string[] = [];
    for (let f = 0; f < flips; f++) {
      const at = region.offset + rng.int(region.length);
      const b = Buffer.alloc(1);
      medium.readSync(b, at);
      const mask = 1 + rng.int(255);
      b[0] = b[0]! ^ mask;
      medium.writeSync(b, at);
      what.push(`${at}^${mask}`);
    }
    const resealed = region.reseal !== undefined && rng.next() < 0.4;
    if (resealed) await region.reseal!(medium);
    const damage = `flip ${i} (seed ${seed}): ${region.what} ${what.join(',')}${resealed ? ' resealed' : ''}`;

    const watch = new BoundsWatch(medium, 20_000);
    const report = await checkCache(watch);
    assert.deepEqual(watch.violations, [], damage);
    assert.ok(watch.reads <= 20_000, `${damage}: the check did not stop`);
    const crashed = report.problems.find((p) => p.startsWith('check stopped'));
    assert.equal(crashed, undefined, `${damage}: an exception escaped inside check: ${crashed}`);
    if (report.clean) clean++;
    for (const p of report.problems) kinds.add(p.replace(/\d+/g, 'N').slice(0, 60));

    medium.writeSync(saved, region.offset);
  }
  const restored = await checkCache(medium);
  assert.equal(restored.clean, true, 'every flip was undone');
  t.diagnostic(`${FLIPS} flips in ${Date.now() - start} ms: ${clean} still clean, ${kinds.size} kinds of problem`);
  // The flips reached both outcomes and many different checks, not just the first crc.
  assert.ok(clean > 0 && clean < FLIPS);
  assert.ok(kinds.size >= 15, [...kinds].join('\n'));
});

test('fuzz setup: every key of the image lies in a data region that gets flipped', async () => {
  const img = await buildLoggedImage(new SparseMedium(512 * MiB));
  const { data, log } = regions(img);
  assert.equal(data.length, img.expect.keys);
  assert.equal(log.length, img.ksets.length + 1);
  assert.ok(log.every((r) => r.length >= KSET_HEADER_SIZE && r.length <= KSET_HEADER_SIZE * 2 + KEY_SIZE * 3));
});
