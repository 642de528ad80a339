import { UsageError } from './errors.js';

export type OptionSpec = { type: 'boolean' } | { type: 'string'; /** Shown in messages, e.g. 'N'. */ value?: string };

export type OptionValues<S extends Record<string, OptionSpec>> = {
  [K in keyof S]?: S[K] extends { type: 'boolean' } ? boolean : string;
};

export interface ParsedArgs<S extends Record<string, OptionSpec>> {
  options: OptionValues<S>;
  positionals: string[];
  help: boolean;
}

/**
 * Parse `--name`, `--name value`, `--name=value` and positionals; `--` ends the options.
 * Stricter than most parsers on purpose: an unknown or repeated option is an error, so a typo
 * never silently formats a device with the wrong settings.
 */
export function parseArgs<S extends Record<string, OptionSpec>>(
  argv: readonly string[],
  spec: S,
  positionals: { min: number; max: number; names: string },
): ParsedArgs<S> {
  const options: Record<string, string | boolean> = {};
  const rest: string[] = [];
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      rest.push(...argv.slice(i + 1));
      break;
    }
    if (arg === '-h' || arg === '--help') {
      help = true;
      continue;
    }
    if (!arg.startsWith('-') || arg === '-') {
      rest.push(arg);
      continue;
    }
    if (!arg.startsWith('--')) throw new UsageError(`unknown option ${arg}`);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const opt = Object.hasOwn(spec, name) ? spec[name] : undefined;
    if (!opt) throw new UsageError(`unknown option --${name}`);
    if (Object.hasOwn(options, name)) throw new UsageError(`option --${name} is given more than once`);
    if (opt.type === 'boolean') {
      if (eq >= 0) throw new UsageError(`option --${name} takes no value`);
      options[name] = true;
      continue;
    }
    let value: string | undefined;
    if (eq >= 0) value = arg.slice(eq + 1);
    else {
      value = argv[i + 1];
      if (value === undefined) throw new UsageError(`option --${name} needs a value${opt.value ? ` (${opt.value})` : ''}`);
      i++;
    }
    options[name] = value;
  }
  if (!help) {
    if (rest.length < positionals.min) throw new UsageError(`missing ${positionals.names}`);
    if (rest.length > positionals.max) throw new UsageError(`unexpected argument ${rest[positionals.max]}`);
  }
  return { options: options as OptionValues<S>, positionals: rest, help };
}

/** An integer option within [min, max]. */
export function parseIntOption(name: string, text: string, min: number, max: number): number {
  if (!/^\d+$/.test(text.trim())) throw new UsageError(`--${name} must be an integer within ${min}..${max}, not '${text}'`);
  const n = Number(text.trim());
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`--${name} must be an integer within ${min}..${max}, not ${text}`);
  return n;
}

const SIZE_UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** A byte count: digits with an optional binary unit (K, M, G, T, optionally followed by iB or B). */
export function parseSizeOption(name: string, text: string): number {
  const m = /^(\d+)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  const unit = m ? SIZE_UNITS[m[2]!.toLowerCase()] : undefined;
  const n = m && unit !== undefined ? Number(m[1]) * unit : NaN;
  if (!Number.isSafeInteger(n)) throw new UsageError(`--${name} must be a size in bytes (e.g. 268435456 or 256M), not '${text}'`);
  return n;
}

/** HOST:PORT, [IPv6]:PORT, or :PORT for `defaultHost`. */
export function parseHostPort(name: string, text: string, defaultHost: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  if (!m) throw new UsageError(`--${name} takes HOST:PORT, not '${text}'`);
  const port = Number(m[3]);
  if (port > 65535) throw new UsageError(`--${name}: port ${port} is out of range`);
  return { host: m[1] ?? (m[2] || defaultHost), port };
}
