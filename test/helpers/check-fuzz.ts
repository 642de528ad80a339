/**
 * The byte-flip fuzz of checkCache. It runs in a worker thread (see check-fuzz-worker.ts): the
 * test runner tracks every promise of the thread that runs tests, which would make the 10,000
 * checks several times slower than they are.
 */
import assert from 'node:assert/strict';
import { checkCache } from '../../src/cache/check.js';
import { CACHE_CTRL_OFF, cacheInfoOffset, dataOffset, genOffset, KSET_HEADER_SIZE, MiB, SB_OFF, segInfoOffset } from '../../src/format/index.js';
import { buildLoggedImage, resealKset, resealMeta, type LoggedImage } from './image.js';
import { BoundsWatch, SparseMedium } from './media.js';
import { seededRng, type Rng } from './rng.js';

export interface Region {
  what: string;
  offset: number;
  length: number;
  /** How to make the crc match the damaged bytes again, so that deeper checks see them. */
  reseal?: (m: SparseMedium) => Promise<void>;
}

/** Where flips land: every metadata record, every kset, the log after them, and the key data. */
export function fuzzRegions(img: LoggedImage): { meta: Region[]; log: Region[]; data: Region[] } {
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
      // Reseal only sizes a kset header can claim sensibly; a key_num of millions is the decoder's job.
      const head = Buffer.alloc(KSET_HEADER_SIZE);
      await m.read(head, k.offset);
      if (head.readUInt32LE(4) <= 200) await resealKset(m, k.offset);
    },
  }));
  const last = img.ksets[img.ksets.length - 1]!;
  log.push({ what: 'the log after its end', offset: last.offset + last.size, length: 2048 });
  const data: Region[] = [];
  for (const k of img.ksets) {
    for (const key of k.keys ?? []) data.push({ what: `data of key ${key.off}`, offset: dataOffset(key.seg, key.segOff), length: key.len });
  }
  return { meta, log, data };
}

function pick<T>(rng: Rng, items: readonly T[]): T {
  return items[rng.int(items.length)]!;
}

export interface FuzzResult {
  flips: number;
  ms: number;
  /** Flips after which the check still found nothing wrong (a harmless byte, or an empty slot). */
  clean: number;
  /** Distinct problem messages, numbers masked. */
  kinds: string[];
}

const READ_LIMIT = 20_000;

/** Flip bytes of a small image with a log, check after each, undo; fails on any escape. */
export async function runCheckFuzz(seed: number, flips: number): Promise<FuzzResult> {
  const medium = new SparseMedium(512 * MiB, 'fuzz');
  const img = await buildLoggedImage(medium);
  const baseline = await checkCache(medium);
  assert.equal(baseline.clean, true, baseline.problems.join('; '));
  const { meta, log, data } = fuzzRegions(img);
  const rng = seededRng(seed);
  let clean = 0;
  const kinds = new Set<string>();
  const start = Date.now();

  for (let i = 0; i < flips; i++) {
    const roll = rng.next();
    let region: Region;
    if (roll < 0.35) region = pick(rng, meta);
    else if (roll < 0.8) region = pick(rng, log);
    else if (roll < 0.9) region = pick(rng, data);
    else region = { what: 'anywhere', offset: rng.int(medium.size()), length: 1 };
    const saved = Buffer.alloc(region.length);
    medium.readSync(saved, region.offset);
    const count = rng.next() < 0.15 ? 2 + rng.int(3) : 1;
    const what: string[] = [];
    for (let f = 0; f < count; f++) {
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

    const watch = new BoundsWatch(medium, READ_LIMIT);
    const report = await checkCache(watch);
    assert.deepEqual(watch.violations, [], `${damage}: access outside the device`);
    assert.ok(watch.reads <= READ_LIMIT, `${damage}: the check did not stop`);
    const crashed = report.problems.find((p) => p.startsWith('check stopped'));
    assert.equal(crashed, undefined, `${damage}: an exception escaped inside check`);
    if (report.clean) clean++;
    for (const p of report.problems) kinds.add(p.replace(/\d+|0x[0-9a-f]+/g, 'N').slice(0, 60));
    medium.writeSync(saved, region.offset);
  }
  const restored = await checkCache(medium);
  assert.equal(restored.clean, true, 'every flip was undone');
  return { flips, ms: Date.now() - start, clean, kinds: [...kinds] };
}
