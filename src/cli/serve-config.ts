/**
 * `pcache serve --config FILE`: the devices and options of one server in a file, for service
 * managers (contrib/pcache@.service reads /etc/pcache/<instance>.conf). One `key = value` a line;
 * `#` starts a comment. The keys are serve's long options without the dashes, plus the devices:
 *
 *   cache-dev   = /dev/pmem0
 *   backing-dev = nbd://backing.example:10809/vol0
 *   table       = cache_mode writeback data_crc true   # dm-pcache's table options, optional
 *   listen      = 0.0.0.0:10809
 *   metrics     = 127.0.0.1:9810
 *   log-format  = json
 *
 * The file becomes the start of the command line, so what it says is checked exactly as the same
 * options typed out would be; an option given both in the file and on the command line is an error.
 */
import { readFileSync } from 'node:fs';
import type { OptionSpec } from './args.js';
import { CliError } from './errors.js';

const DEVICE_KEYS = ['cache-dev', 'backing-dev', 'table'] as const;

function configPath(argv: readonly string[]): { path: string; rest: string[] } | null {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') break;
    if (a === '--config' || a.startsWith('--config=')) {
      const path = a === '--config' ? argv[i + 1] : a.slice('--config='.length);
      if (path === undefined || path === '') throw new CliError('option --config needs a value (FILE)');
      const rest = [...argv.slice(0, i), ...argv.slice(i + (a === '--config' ? 2 : 1))];
      if (rest.some((r) => r === '--config' || r.startsWith('--config='))) throw new CliError('option --config is given more than once');
      return { path, rest };
    }
  }
  return null;
}

/** Parses a config file's text into serve's argv (devices and table words first, then options). */
export function configToArgv(text: string, file: string, optionNames: readonly string[]): string[] {
  const values = new Map<string, string>();
  const lines = text.split(/\r?\n/);
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n]!.replace(/(^|\s)#.*$/, '').trim();
    if (line === '') continue;
    const where = `${file}:${n + 1}`;
    const m = /^([a-z][a-z-]*)\s*=\s*(.*)$/.exec(line);
    if (!m) throw new CliError(`${where}: expected 'key = value', not '${line}'`);
    const [, key, value] = m as unknown as [string, string, string];
    if (!(DEVICE_KEYS as readonly string[]).includes(key) && !optionNames.includes(key)) {
      throw new CliError(`${where}: unknown key '${key}' (known: ${[...DEVICE_KEYS, ...optionNames].join(', ')})`);
    }
    if (values.has(key)) throw new CliError(`${where}: '${key}' is given more than once`);
    if (value === '') throw new CliError(`${where}: '${key}' has no value`);
    values.set(key, value);
  }
  const cache = values.get('cache-dev');
  const backing = values.get('backing-dev');
  if (!cache || !backing) throw new CliError(`${file}: needs both cache-dev and backing-dev`);
  const argv = [cache, backing];
  const table = values.get('table');
  if (table !== undefined) {
    const words = table.split(/\s+/);
    // dm-pcache's table starts with the count of option words; the file may leave it out.
    argv.push(...(/^\d+$/.test(words[0]!) ? words : [String(words.length), ...words]));
  }
  for (const [key, value] of values) if (!(DEVICE_KEYS as readonly string[]).includes(key)) argv.push(`--${key}=${value}`);
  return argv;
}

function hasPositional(argv: readonly string[], spec: Record<string, OptionSpec>): boolean {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') return i + 1 < argv.length;
    if (!a.startsWith('-') || a === '-') return true;
    const name = a.slice(2);
    if (Object.hasOwn(spec, name) && spec[name]!.type === 'string') i++;
  }
  return false;
}

/** serve's argv with `--config FILE` replaced by what the file says; unchanged without it. */
export function expandConfig(argv: readonly string[], spec: Record<string, OptionSpec>): string[] {
  const optionNames = Object.keys(spec);
  const found = configPath(argv);
  if (!found) return [...argv];
  let text: string;
  try {
    text = readFileSync(found.path, 'utf8');
  } catch (err) {
    throw new CliError(`config file ${found.path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'does not exist' : (err as Error).message}`);
  }
  const fromFile = configToArgv(text, found.path, optionNames.filter((o) => o !== 'config'));
  if (hasPositional(found.rest, spec)) throw new CliError(`--config ${found.path} names the devices; give none on the command line`);
  return [...fromFile, ...found.rest];
}
