import { crc32c } from '@node-rs/crc32';

/** dm-pcache's seed for every checksum on media. */
export const PCACHE_CRC_SEED = 0x0003b15a;

/**
 * CRC32C as a raw update from `seed` (no initial or final inversion), which is what the kernel's
 * crc32c() computes. The library computes the standard form, so invert around it.
 */
export function pcacheCrc(data: Uint8Array, seed: number = PCACHE_CRC_SEED): number {
  if (data.length === 0) return seed >>> 0;
  return ~crc32c(data as Buffer, ~seed >>> 0) >>> 0;
}
