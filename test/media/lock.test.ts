import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openFileMedium } from '../../src/media/file.js';
import { acquireDeviceLock, lockFilePath, runDir } from '../../src/media/lock.js';
import { scratch } from './helpers.js';

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

test('the runtime directory follows PCACHE_RUN_DIR', () => {
  assert.equal(runDir(), join(dir, 'run'));
});

test('a second open in the same process fails, naming the device, even through a symlink', async () => {
  const path = device('twice.img');
  const link = join(dir, 'twice-link.img');
  symlinkSync(path, link);
  const m = await openFileMedium(path);
  await assert.rejects(openFileMedium(path), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'EBUSY');
    assert.match(err.message, new RegExp(`cache device ${path} is already open in this process`));
    return true;
  });
  await assert.rejects(openFileMedium(link), /twice-link\.img is already open/);
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
  const lockFile = await lockFilePath(path);
  const m = await openFileMedium(path);
  assert.equal(readFileSync(lockFile, 'utf8').split('\n')[0], String(process.pid));
  await m.close();
  assert.equal(existsSync(lockFile), false);
  const again = await openFileMedium(path);
  await again.close();
});

test('lock: false takes no lock', async () => {
  const path = device('nolock.img');
  const a = await openFileMedium(path, { lock: false });
  const b = await openFileMedium(path, { lock: false });
  assert.equal(existsSync(await lockFilePath(path)), false);
  await a.close();
  await b.close();
});

test('a lock held by a live process fails at once, naming the device and the pid', async () => {
  const path = device('live.img');
  const holder = spawn('sleep', ['30'], { stdio: 'ignore' });
  try {
    mkdirSync(runDir(), { recursive: true });
    writeFileSync(await lockFilePath(path), `${holder.pid}\n`);
    const started = Date.now();
    await assert.rejects(openFileMedium(path), (err: Error) => {
      assert.equal(err.message, `cache device ${path} is in use by another pcache (pid ${holder.pid})`);
      return true;
    });
    assert.ok(Date.now() - started < 1000, 'must fail at once, not wait');
    assert.equal(readFileSync(await lockFilePath(path), 'utf8'), `${holder.pid}\n`, 'a live lock is left alone');
  } finally {
    holder.kill('SIGKILL');
    await exited(holder);
  }
  // Now the holder is dead: its lock is stale and is taken over.
  const m = await openFileMedium(path);
  assert.equal(readFileSync(await lockFilePath(path), 'utf8').split('\n')[0], String(process.pid));
  await m.close();
});

test('a stale or garbage lock file is taken over', async () => {
  const gone = spawn('true', { stdio: 'ignore' });
  await exited(gone);
  for (const [i, content] of [`${gone.pid}\n`, '', 'not a pid\n', '0\n', '-1\n'].entries()) {
    const path = device(`stale-${i}.img`);
    mkdirSync(runDir(), { recursive: true });
    writeFileSync(await lockFilePath(path), content);
    const lock = await acquireDeviceLock(path);
    assert.equal(readFileSync(lock.file, 'utf8').split('\n')[0], String(process.pid), `content ${JSON.stringify(content)}`);
    await lock.release();
    assert.equal(existsSync(lock.file), false);
  }
});

test('another pcache process holds the lock until it dies', async () => {
  const path = device('child.img');
  const code = `
    const { openFileMedium } = await import(${JSON.stringify(new URL('../../src/media/file.ts', import.meta.url).href)});
    await openFileMedium(${JSON.stringify(path)});
    process.stdout.write('ready\\n');
    setInterval(() => {}, 1000);
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: process.env,
  });
  try {
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (d: Buffer) => d.toString().includes('ready') && resolve());
      child.once('exit', (c) => reject(new Error(`child exited early (${c})`)));
    });
    await assert.rejects(openFileMedium(path), new RegExp(`in use by another pcache \\(pid ${child.pid}\\)`));
  } finally {
    child.kill('SIGKILL');
    await exited(child);
  }
  const m = await openFileMedium(path);
  await m.close();
});

test('processes racing to take over one stale lock: exactly one wins', async () => {
  const path = device('contended.img');
  const gone = spawn('true', { stdio: 'ignore' });
  await exited(gone);
  mkdirSync(runDir(), { recursive: true });
  writeFileSync(await lockFilePath(path), `${gone.pid}\n`);
  const code = `
    const { acquireDeviceLock } = await import(${JSON.stringify(new URL('../../src/media/lock.ts', import.meta.url).href)});
    try {
      await acquireDeviceLock(${JSON.stringify(path)});
      console.log('won');
      setTimeout(() => {}, 3000);
    } catch (err) {
      console.log(/in use by another pcache/.test(err.message) ? 'busy' : 'error ' + err.message);
    }
  `;
  const children = Array.from({ length: 4 }, () =>
    spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: process.env,
    }),
  );
  try {
    const outcomes = await Promise.all(
      children.map(
        (c) =>
          new Promise<string>((resolve) => {
            let out = '';
            c.stdout!.on('data', (d: Buffer) => {
              out += d.toString();
              if (out.includes('\n')) resolve(out.trim());
            });
          }),
      ),
    );
    assert.deepEqual(outcomes.sort(), ['busy', 'busy', 'busy', 'won']);
  } finally {
    for (const c of children) c.kill('SIGKILL');
    await Promise.all(children.map(exited));
  }
});
