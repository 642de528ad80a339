/**
 * `pcache serve` logs: one line per event with an ISO time and a level, as text or JSON lines;
 * --log-level filters; `--config FILE` starts the same server a command line would.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { parseServeArgs } from '../../src/cli/serve.js';
import { REPO_ROOT, runPcache, runPcacheInProcess } from '../helpers/cli.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface LogRecord {
  time: string;
  level: string;
  event: string;
  msg: string;
  [field: string]: unknown;
}

function jsonLines(stderr: string): LogRecord[] {
  return stderr
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const r = JSON.parse(l) as LogRecord;
      assert.match(r.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, l);
      assert.ok(['debug', 'info', 'warn', 'error'].includes(r.level), l);
      assert.equal(typeof r.event, 'string');
      return r;
    });
}

async function waitFor(what: string, cond: () => boolean): Promise<void> {
  const end = Date.now() + 20_000;
  while (!cond()) {
    assert.ok(Date.now() < end, `timed out waiting for ${what}`);
    await sleep(25);
  }
}

test('--log-format json --log-level debug: every stderr line is a JSON record; start, replay, client connect/disconnect and stop are logged', async (t) => {
  if (!(await haveTool('nbdinfo'))) return t.skip('nbdinfo is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const srv = await startServe(dir, cache, backing, [], ['--log-format', 'json', '--log-level', 'debug']);
  let stopped = false;
  t.after(() => (stopped ? undefined : srv.kill()));
  const info = await run('nbdinfo', ['--size', srv.uri]);
  assert.equal(info.code, 0, info.stderr);
  assert.equal(info.stdout.trim(), String(64 * MiB));
  await waitFor('the disconnect line', () => srv.stderr().includes('"event":"disconnect"'));
  await srv.stop();
  stopped = true;

  const records = jsonLines(srv.stderr());
  const byEvent = (e: string): LogRecord => {
    const r = records.find((x) => x.event === e);
    assert.ok(r, `a '${e}' record in ${srv.stderr()}`);
    return r;
  };
  const replay = byEvent('replay');
  assert.equal(replay.level, 'info');
  assert.equal(typeof replay.seconds, 'number');
  assert.equal(replay.keys, 0);
  const start = byEvent('start');
  assert.equal(start.cacheDev, cache);
  assert.equal(start.backingDev, backing);
  assert.equal(start.cacheSize, 512 * MiB);
  assert.equal(start.backingSize, 64 * MiB);
  assert.equal(start.uri, srv.uri);
  assert.equal(byEvent('connect').level, 'debug');
  assert.equal(byEvent('disconnect').level, 'debug');
  assert.equal(byEvent('stop').level, 'info');
  assert.equal(byEvent('stopped').dirtyBytes, 0);
  const order = ['replay', 'start', 'connect', 'disconnect', 'stop', 'stopped'].map((e) => records.findIndex((r) => r.event === e));
  assert.deepEqual([...order].sort((a, b) => a - b), order, 'the events come in order');
});

test('--log-level warn leaves out info and debug; text lines carry an ISO time and the level', async (t) => {
  if (!(await haveTool('nbdinfo'))) return t.skip('nbdinfo is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const quiet = await startServe(dir, cache, backing, [], ['--log-level', 'warn']);
  const info = await run('nbdinfo', ['--size', quiet.uri]);
  assert.equal(info.code, 0, info.stderr);
  await quiet.stop();
  assert.equal(quiet.stderr(), '', 'nothing at warn or above happened');

  const text = await startServe(dir, cache, backing);
  await text.stop();
  const lines = text.stderr().split('\n').filter(Boolean);
  assert.ok(lines.length >= 4, text.stderr());
  for (const l of lines) assert.match(l, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO |WARN |ERROR) [a-z-]+: /, l);
  assert.match(text.stderr(), / INFO  start: serving .*cacheSize=536870912 /);
  assert.doesNotMatch(text.stderr(), /DEBUG/);

  const bad = await runPcacheInProcess(['serve', cache, backing, '--log-level', 'loud']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--log-level must be one of debug, info, warn, error, not 'loud'/);
});

test('serve --config FILE: the file gives the devices and options; mistakes name the file and line', async (t) => {
  if (!(await haveTool('nbdinfo'))) return t.skip('nbdinfo is not installed');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 64 * MiB);
  const socket = join(dir, 'conf.sock');
  const conf = join(dir, 'vol0.conf');
  await writeFile(
    conf,
    [
      '# a pcache service instance',
      `cache-dev   = ${cache}`,
      `backing-dev = ${backing}`,
      'table = data_crc true   # dm-pcache table options',
      `socket = ${socket}`,
      'export = vol0',
      'log-format = json',
      '',
    ].join('\n'),
  );
  const cfg = parseServeArgs(['--config', conf, '--log-level', 'debug']);
  assert.equal(cfg.cacheDev, cache);
  assert.equal(cfg.backingDev, backing);
  assert.equal(cfg.table.dataCrc, true);
  assert.equal(cfg.socket, socket);
  assert.equal(cfg.exportName, 'vol0');
  assert.equal(cfg.logFormat, 'json');
  assert.equal(cfg.logLevel, 'debug');

  const viaConfig = await startServeFromConfig(conf);
  try {
    const info = await run('nbdinfo', ['--size', `nbd+unix:///vol0?socket=${socket}`]);
    assert.equal(info.code, 0, info.stderr);
    assert.equal(info.stdout.trim(), String(64 * MiB));
    const table = await runPcache(['table', cache]);
    assert.match(table.stdout, / crc true$/m);
  } finally {
    await viaConfig.stop();
  }

  const wrong = join(dir, 'wrong.conf');
  await writeFile(wrong, `cache-dev = ${cache}\nbacking-dev = ${backing}\nlisten-on = 1.2.3.4:5\n`);
  const r = await runPcacheInProcess(['serve', '--config', wrong]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /wrong\.conf:3: unknown key 'listen-on'/);
  const both = await runPcacheInProcess(['serve', '--config', conf, '--export', 'x']);
  assert.match(both.stderr, /--export is given more than once/);
  const devs = await runPcacheInProcess(['serve', '--config', conf, cache]);
  assert.match(devs.stderr, /names the devices; give none on the command line/);
  const none = await runPcacheInProcess(['serve', '--config', join(dir, 'absent.conf')]);
  assert.match(none.stderr, /absent\.conf: does not exist/);
});

/** `pcache serve --config FILE` as a child, ready once it prints its status line. */
async function startServeFromConfig(conf: string): Promise<{ stop(): Promise<void> }> {
  const child = spawn(process.execPath, [join(REPO_ROOT, 'bin/pcache.js'), 'serve', '--config', conf], {
    cwd: REPO_ROOT,
    env: process.env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const end = Date.now() + 60_000;
  while (!out.includes(' pcache ')) {
    if (child.exitCode !== null || Date.now() > end) throw new Error(`serve --config did not start: ${err}`);
    await sleep(25);
  }
  jsonLines(err);
  return {
    async stop() {
      child.kill('SIGTERM');
      assert.equal(await exited, 0);
      const records = jsonLines(err);
      assert.ok(records.some((r) => r.event === 'stopped'), err);
    },
  };
}
