import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, linkSync, mkdirSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openFileBacking } from '../../src/backing/file.js';
import { openFileMedium } from '../../src/media/file.js';
import { ensureRunDir, runDir } from '../../src/media/lock.js';
import { attachLoop, scratch } from './helpers.js';

const dir = scratch('lock');

function device(name: string): string {
  const path = join(dir, name);
  writeFileSync(path, Buffer.alloc(4096));
  return path;
}

function exited(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
}

/** Another process that opens `path` as a cache device (or a backing device) and holds it. */
async function holder(path: string, what: 'medium' | 'backing', env: NodeJS.ProcessEnv = process.env): Promise<ChildProcess> {
  const mod = what === 'medium' ? '../../src/media/file.ts' : '../../src/backing/file.ts';
  const fn = what === 'medium' ? 'openFileMedium' : 'openFileBacking';
  const code = `
    const m = await import(${JSON.stringify(new URL(mod, import.meta.url).href)});
    await m.${fn}(${JSON.stringify(path)});
    process.stdout.write('ready\\n');
    setInterval(() => {}, 1000);
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'], env });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => d.toString().includes('ready') && resolve());
    child.once('exit', (c) => reject(new Error(`holder exited early (${c})`)));
  });
  return child;
}

test('the runtime directory follows PCACHE_RUN_DIR and is made owner-only whatever the umask', async () => {
  assert.equal(runDir(), join(dir, 'run'));
  const old = process.umask(0);
  try {
    await ensureRunDir();
  } finally {
    process.umask(old);
  }
  assert.equal(statSync(runDir()).mode & 0o777, 0o700);
});

test('a shared directory given as PCACHE_RUN_DIR (sticky, writable by all, like /tmp) is left as it is', async () => {
  const shared = join(dir, 'shared-run');
  mkdirSync(shared);
  chmodSync(shared, 0o1777);
  const before = process.env.PCACHE_RUN_DIR;
  process.env.PCACHE_RUN_DIR = shared;
  try {
    await ensureRunDir();
  } finally {
    process.env.PCACHE_RUN_DIR = before;
  }
  assert.equal(statSync(shared).mode & 0o7777, 0o1777);
});

test('a second open in the same process fails, naming the device, through a symlink and a hard link', async () => {
  const path = device('twice.img');
  const link = join(dir, 'twice-link.img');
  const hard = join(dir, 'twice-hard.img');
  symlinkSync(path, link);
  linkSync(path, hard);
  const m = await openFileMedium(path);
  await assert.rejects(openFileMedium(path), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'EBUSY');
    assert.equal(err.message, `cache device ${path} is in use by this process (pid ${process.pid}): it is already open here`);
    return true;
  });
  await assert.rejects(openFileMedium(link), /twice-link\.img is in use by this process/);
  await assert.rejects(openFileMedium(hard), /twice-hard\.img is in use by this process/);
  await m.close();
});

test('of two concurrent opens exactly one wins', async () => {
  const path = device('race.img');
  const results = await Promise.allSettled([openFileMedium(path), openFileMedium(path)]);
  assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
  for (const r of results) if (r.status === 'fulfilled') await r.value.close();
});

test('close releases the lock, so the device can be opened again', async () => {
  const path = device('reopen.img');
  const m = await openFileMedium(path);
  await m.close();
  const again = await openFileMedium(path);
  await again.close();
});

test('lock: false takes no lock', async () => {
  const path = device('nolock.img');
  const a = await openFileMedium(path, { lock: false });
  const b = await openFileMedium(path, { lock: false });
  await a.close();
  await b.close();
});

test('readers share a device; a reader and a writer exclude each other', async () => {
  const path = device('readers.img');
  const r1 = await openFileMedium(path, { readOnly: true });
  const r2 = await openFileMedium(path, { readOnly: true });
  await assert.rejects(openFileMedium(path), /readers\.img is in use by this process/);
  await r1.close();
  await r2.close();
  const w = await openFileMedium(path);
  await assert.rejects(openFileMedium(path, { readOnly: true }), { code: 'EBUSY' });
  await w.close();
});

test('a hard link opened by another process under another run directory is refused, naming the holder', async () => {
  const path = device('hard.img');
  const link = join(dir, 'hard-2.img');
  linkSync(path, link);
  // The holder keeps its sockets elsewhere: the run directory must not matter.
  const child = await holder(path, 'medium', { ...process.env, PCACHE_RUN_DIR: join(dir, 'other-run') });
  try {
    const started = Date.now();
    await assert.rejects(openFileMedium(link), (err: NodeJS.ErrnoException) => {
      assert.equal(err.code, 'EBUSY');
      assert.match(err.message, new RegExp(`^cache device ${link} is in use by another program \\(pid ${child.pid}: .*node`));
      return true;
    });
    assert.ok(Date.now() - started < 5000, 'must fail at once, not wait');
  } finally {
    child.kill('SIGKILL');
    await exited(child);
  }
  // The kernel dropped the dead holder's lock: nothing stale is left to take over.
  const m = await openFileMedium(link);
  await m.close();
});

test('a backing file is claimed: a second cache over it is refused, naming the first', async () => {
  const path = device('backing.img');
  const child = await holder(path, 'backing');
  try {
    await assert.rejects(openFileBacking(path), { message: new RegExp(`^backing device ${path} is in use by another program \\(pid ${child.pid}`) });
    // The same file as a cache device is refused too.
    await assert.rejects(openFileMedium(path), { code: 'EBUSY' });
  } finally {
    child.kill('SIGKILL');
    await exited(child);
  }
  const b = await openFileBacking(path);
  await assert.rejects(openFileBacking(path), /in use by this process/);
  await b.close();
});

test('a loop device over a held cache file is refused, and the file under a held loop device', async (t) => {
  const img = join(dir, 'loop.img');
  writeFileSync(img, '');
  truncateSync(img, 4 * 1024 * 1024);
  const loop = attachLoop(img);
  if (!loop) return t.skip('needs root and a free loop device');
  try {
    const m = await openFileMedium(img);
    await assert.rejects(openFileMedium(loop.dev), new RegExp(`cache device ${loop.dev} \\(a loop device over ${img}\\) is in use by this process`));
    await m.close();
    const viaLoop = await openFileMedium(loop.dev);
    await assert.rejects(openFileMedium(img), /loop\.img is in use by this process/);
    await viaLoop.close();
  } finally {
    loop.detach();
  }
});
