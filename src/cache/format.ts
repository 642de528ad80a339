import {
  CACHE_MODES,
  DEFAULT_FORMAT_OPTIONS,
  FormatError,
  freshFormat,
  GC_PERCENT_MAX,
  MAX_SEGMENTS,
  SB_OFF,
  SB_SIZE,
  segmentsFor,
  type FormatOptions,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';

export interface FormatSummary {
  /** Segments the superblock declares (and the cache uses). */
  segNum: number;
  options: FormatOptions;
}

/** Reject options the on-media flags cannot represent, before anything is written. */
export function validateFormatOptions(opts: FormatOptions): FormatError | null {
  if (!CACHE_MODES.includes(opts.mode)) return new FormatError('bad-option', `unknown cache mode ${String(opts.mode)}`);
  if (!Number.isInteger(opts.gcPercent) || opts.gcPercent < 0 || opts.gcPercent > GC_PERCENT_MAX) {
    return new FormatError('bad-option', `gc_percent must be an integer within 0..${GC_PERCENT_MAX}, not ${opts.gcPercent}`);
  }
  return null;
}

/**
 * Lay out a fresh cache on `medium`, byte for byte as dm-pcache does on first use, and make it
 * durable. The superblock is written last, after everything else is synced, and any old one is
 * cleared first: an interrupted format then leaves an unformatted device, never a superblock
 * that vouches for half-written metadata.
 */
export async function formatCache(medium: Medium, options: Partial<FormatOptions> = {}): Promise<FormatSummary | FormatError> {
  const opts: FormatOptions = { ...DEFAULT_FORMAT_OPTIONS, ...options };
  const bad = validateFormatOptions(opts);
  if (bad) return bad;
  const writes = freshFormat(medium.size(), opts);
  if (writes instanceof FormatError) return writes;

  const sb = writes.filter((w) => w.offset === SB_OFF);
  const rest = writes.filter((w) => w.offset !== SB_OFF);
  await medium.write(Buffer.alloc(SB_SIZE), SB_OFF);
  await medium.sync();
  for (const w of rest) await medium.write(w.data, w.offset);
  await medium.sync();
  for (const w of sb) await medium.write(w.data, w.offset);
  await medium.sync();
  return { segNum: Math.min(segmentsFor(medium.size()), MAX_SEGMENTS), options: opts };
}
