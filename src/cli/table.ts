import { parseSizeOption } from './args.js';
import { CliError, EXIT_USAGE } from './errors.js';

/** dm-pcache's table options: `<n> [cache_mode writeback] [data_crc true|false]`. */
export interface TableOptions {
  cacheMode: 'writeback';
  dataCrc: boolean;
}

function bad(message: string): CliError {
  return new CliError(message, EXIT_USAGE);
}

/**
 * Parse the option group after the two devices exactly as dm-pcache's constructor does, with its
 * messages: a count from 0 to 4 that matches the words after it, then key/value pairs.
 */
export function parseTableOptions(words: readonly string[]): TableOptions {
  const opts: TableOptions = { cacheMode: 'writeback', dataCrc: false };
  if (words.length === 0) return opts;
  const countWord = words[0]!;
  const count = /^\d+$/.test(countWord) ? Number(countWord) : NaN;
  if (!Number.isInteger(count) || count > 4 || count !== words.length - 1) throw bad('Invalid number of cache option arguments');
  let i = 1;
  while (i < words.length) {
    const key = words[i++]!;
    if (key === 'cache_mode') {
      if (i >= words.length) throw bad('Missing value for cache_mode');
      if (words[i++] !== 'writeback') throw bad('Invalid cache mode parameter');
    } else if (key === 'data_crc') {
      if (i >= words.length) throw bad('Missing value for data_crc');
      const v = words[i++];
      if (v === 'true') opts.dataCrc = true;
      else if (v === 'false') opts.dataCrc = false;
      else throw bad('Invalid data crc parameter');
    } else {
      throw bad('Unrecognised cache option requested');
    }
  }
  return opts;
}

/** The message dm-pcache accepts: exactly `gc_percent N`, the name in any case, N in 0..90, base 10. */
export function parseGcPercentMessage(words: readonly string[]): number | null {
  if (words.length !== 2) return null;
  if (words[0]!.toLowerCase() !== 'gc_percent') return null;
  if (!/^\d+$/.test(words[1]!)) return null;
  const n = Number(words[1]);
  return n <= 90 ? n : null;
}

/**
 * The messages a running server takes: dm-pcache's `gc_percent N`, and pcache's own
 * `sequential_cutoff BYTES` (bcache's knob; BYTES may carry a binary unit, e.g. 4M; 0 turns it off).
 * Exactly two words, the name in any case; anything else is null (EINVAL).
 */
export function parseMessage(words: readonly string[]): { name: 'gc_percent' | 'sequential_cutoff'; value: number } | null {
  const gc = parseGcPercentMessage(words);
  if (gc !== null) return { name: 'gc_percent', value: gc };
  if (words.length !== 2 || words[0]!.toLowerCase() !== 'sequential_cutoff') return null;
  try {
    return { name: 'sequential_cutoff', value: parseSizeOption('sequential_cutoff', words[1]!) };
  } catch {
    return null;
  }
}
