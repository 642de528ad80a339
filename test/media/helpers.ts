import { execFileSync } from 'node:child_process';
import { mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';

/** A scratch directory, with the runtime directory pointed inside it so tests never touch /run. */
export function scratch(prefix: string): string {
  const dir = realpathSync(mkdtempSync(join(tmpdir(), `pcache-${prefix}-`)));
  process.env.PCACHE_RUN_DIR = join(dir, 'run');
  after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 17 + (i >> 9)) & 0xff;
  return b;
}

/** Attaches `file` to a loop device, or returns null where that is not possible (not root, no loop). */
export function attachLoop(file: string): { dev: string; detach(): void } | null {
  if (process.getuid?.() !== 0) return null;
  let dev: string;
  try {
    dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return null;
  }
  return { dev, detach: () => execFileSync('losetup', ['-d', dev]) };
}
