import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import type { CheckReport } from '../../src/cache/check.js';
import type { CacheDump } from '../../src/cache/dump.js';
import { runPcache, runPcacheInProcess, type CliResult } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;

async function sparseFile(dir: string, name: string, size: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, '');
  await truncate(path, size);
  return path;
}

function noStack(r: CliResult): void {
  assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
  assert.doesNotMatch(r.stderr, /internal error/);
}

for (const [size, segs] of [
  [512 * MiB, 31],
  [4096 * MiB, 255],
] as const) {
  test(`format then check and dump a ${size / MiB} MiB sparse file: clean, ${segs} segments, positions 0:0`, async () => {
    const dir = await tempDir();
    const dev = await sparseFile(dir, 'cache.img', size);
    const fmt = await runPcache(['format', dev]);
    assert.equal(fmt.code, 0, fmt.stderr);
    assert.match(fmt.stdout, new RegExp(`${segs} segments`));

    // One at a time: every command claims the device, as a running cache would.
    const check = await runPcache(['check', dev]);
    const json = await runPcache(['check', dev, '--json']);
    const dump = await runPcache(['dump', dev]);
    const dumpJson = await runPcache(['dump', '--json', dev]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    assert.match(check.stdout, /problems\s+none/);
    assert.match(check.stdout, new RegExp(`segments\\s+${segs} \\(seg_num ${segs}\\), 1 used`));
    assert.match(check.stdout, /key_tail 0:0, dirty_tail 0:0, key_head 0:0/);
    assert.equal(json.code, 0);
    const report = JSON.parse(json.stdout) as CheckReport;
    assert.equal(report.clean, true);
    assert.equal(report.segments, segs);
    assert.equal(report.segNum, segs);
    assert.equal(report.usedSegments, 1);
    assert.equal(report.ksets, 0);
    assert.equal(report.keys, 0);
    assert.equal(report.dataCrc, false);
    assert.deepEqual([report.keyTail, report.dirtyTail, report.keyHead], [{ seg: 0, off: 0 }, { seg: 0, off: 0 }, { seg: 0, off: 0 }]);

    assert.equal(dump.code, 0, dump.stderr);
    assert.match(dump.stdout, new RegExp(`segments\\s+${segs} in the chain`));
    assert.match(dump.stdout, /key_tail\s+slot 0: seq 1 0:0  <- current/);
    assert.match(dump.stdout, /dirty_tail\s+slot 0: seq 1 0:0  <- current/);
    assert.match(dump.stdout, /end 0:0 \(key_head\)/);
    const d = JSON.parse(dumpJson.stdout) as CacheDump;
    assert.equal(d.superblock?.segNum, segs);
    assert.equal(d.segments.length, segs);
    assert.deepEqual(
      d.segments.map((s) => s.phys),
      Array.from({ length: segs }, (_, i) => i),
    );
    assert.equal(d.segments.at(-1)?.info.value?.hasNext, false);
    assert.deepEqual(d.keyTail?.value, { seq: 1, seg: 0, off: 0 });
    assert.deepEqual(d.dirtyTail?.value, { seq: 1, seg: 0, off: 0 });
    assert.deepEqual(d.log?.end, { seg: 0, off: 0 });
    assert.deepEqual(d.log?.ksets, []);
    assert.equal(d.cacheInfo?.current, 1);
    assert.deepEqual(d.cacheInfo?.value, {
      seq: 1,
      segId: 0,
      nSegs: segs,
      flags: 0x1182,
      dataCrc: false,
      initDone: true,
      cacheMode: 'writeback',
      gcPercent: 70,
    });
  });
}

test('format options reach cache_info; a formatted device is refused without --force', async () => {
  const dir = await tempDir();
  const dev = await sparseFile(dir, 'cache.img', 600 * MiB);
  const first = await runPcache(['format', dev, '--data-crc', '--gc-percent', '50', '--cache-mode', 'writeback']);
  assert.equal(first.code, 0, first.stderr);
  const again = await runPcache(['format', dev]);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /^pcache: .*already holds a formatted cache.*--force/);
  noStack(again);
  let d = JSON.parse((await runPcache(['dump', dev, '--json'])).stdout) as CacheDump;
  assert.equal(d.cacheInfo?.value?.dataCrc, true);
  assert.equal(d.cacheInfo?.value?.gcPercent, 50);

  const forced = await runPcache(['format', dev, '--force', '--gc-percent=0']);
  assert.equal(forced.code, 0, forced.stderr);
  d = JSON.parse((await runPcache(['dump', dev, '--json'])).stdout) as CacheDump;
  assert.equal(d.cacheInfo?.value?.dataCrc, false);
  assert.equal(d.cacheInfo?.value?.gcPercent, 0);
  assert.equal((await runPcache(['check', dev])).code, 0);
});

test('format refuses a 511 MiB device with the exact message, and never creates a device', async () => {
  const dir = await tempDir();
  const small = await sparseFile(dir, 'small.img', 511 * MiB);
  const r = await runPcache(['format', small]);
  assert.notEqual(r.code, 0);
  assert.equal(r.stderr, 'pcache: cache device is too small, required at least 536870912\n');
  assert.equal(r.stdout, '');

  const missing = join(dir, 'missing.img');
  const m = await runPcache(['format', missing]);
  assert.notEqual(m.code, 0);
  assert.match(m.stderr, /^pcache: cache device .*missing\.img does not exist/);
  assert.equal(existsSync(missing), false);
  noStack(m);
});

test('the device is claimed while a command runs: a second pcache on it fails at once, naming it', async () => {
  const dir = await tempDir();
  const dev = await sparseFile(dir, 'cache.img', 512 * MiB);
  const results = await Promise.all([runPcache(['format', dev]), runPcache(['format', dev])]);
  const busy = results.filter((r) => r.code !== 0);
  // Usually one loses the race for the lock; if they ran one after the other, the second found a cache.
  assert.equal(busy.length, 1);
  assert.match(busy[0]!.stderr, /in use by another pcache|already holds a formatted cache/);
  assert.ok(busy[0]!.stderr.includes(dev));
  noStack(busy[0]!);
});

test('bad command lines: named, usage pointed to, no stack traces', async () => {
  const dir = await tempDir();
  const dev = await sparseFile(dir, 'cache.img', 512 * MiB);
  const cases: Array<[string[], RegExp, number]> = [
    [[], /^usage: pcache <command>/, 2],
    [['frobnicate'], /^pcache: unknown command 'frobnicate'/, 2],
    [['format'], /^pcache: missing the cache device/, 2],
    [['format', dev, '--gc-percent', '91'], /--gc-percent must be an integer within 0\.\.90/, 2],
    [['format', dev, '--cache-mode', 'writethrough'], /cache mode writethrough is not supported yet; only writeback/, 1],
    [['format', dev, '--cache-mode', 'sideways'], /unknown cache mode 'sideways'/, 2],
    [['check', dev, '--verbose'], /unknown option --verbose/, 2],
    [['check', dev], /magic is 0: the device is not formatted/, 1],
    [['check', dev, '--backing-size', 'lots'], /--backing-size must be a size/, 2],
  ];
  // In-process except for two, which show the same through the real executable.
  const results = await Promise.all(cases.map(([args], i) => (i < 2 ? runPcache(args) : runPcacheInProcess(args))));
  results.forEach((r, i) => {
    const [args, pattern, code] = cases[i]!;
    assert.equal(r.code, code, `pcache ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stdout + r.stderr, pattern, `pcache ${args.join(' ')}`);
    noStack(r);
  });
  const help = await runPcache(['format', '--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^usage: pcache format <cache-dev>/);
});
