/** Running pcache's CLI from tests: as a child process (the real thing) or in-process (fast). */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runCli } from '../../src/cli/run.js';

/** The repository root, found from this file rather than the working directory. */
export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));

/**
 * Lock files of every pcache this test process opens or starts go to a directory of its own, so
 * parallel test files never see each other's claims on a shared fixture image.
 */
const runDir = mkdtempSync(join(tmpdir(), 'pcache-test-run-'));
process.env.PCACHE_RUN_DIR = runDir;
process.on('exit', () => rmSync(runDir, { recursive: true, force: true }));

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** `pcache <args>` as a child process (`node bin/pcache.js`, the source checkout's entry), from the repo root. */
export function runPcache(args: readonly string[], opts: { timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [join(REPO_ROOT, 'bin/pcache.js'), ...args],
      { cwd: REPO_ROOT, env: { ...process.env, PCACHE_RUN_DIR: runDir }, timeout: opts.timeoutMs ?? 60_000, maxBuffer: 256 * 1024 * 1024 },
      (err, stdout, stderr) => {
        if (err && typeof err.code !== 'number') return reject(err);
        resolve({ code: err ? (err.code as number) : 0, stdout, stderr });
      },
    );
  });
}

/** The same command in this process, through the dispatcher. */
export async function runPcacheInProcess(args: readonly string[]): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  const code = await runCli(args, { out: (t) => void (stdout += t), err: (t) => void (stderr += t) });
  return { code, stdout, stderr };
}
