import { createHash } from 'node:crypto';
import type { Repository } from '../repository/index.ts';

/**
 * The chain key in the names of `repository`'s tracking state (QEMU bitmaps, libvirt checkpoints): the first 16
 * hex digits of its config id (128 random bits, docs/FORMAT.md § config), so each repository's chain has its
 * own tracking on every disk.
 */
export function bitmapChainKeyOf(repository: Repository): string {
  const id = repository.config.id.toLowerCase();
  // snapshift writes 32 hex digits; a config id of another shape (edited by hand) still gets a stable key.
  return /^[0-9a-f]{16}/.test(id) ? id.slice(0, 16) : createHash('sha256').update(id).digest('hex').slice(0, 16);
}

/** What a VM's changed-block tracking needs from the repository: its latest restore point and the chain key. */
export async function cbtInputOf(repository: Repository, vmName: string, options: { tag: string; full?: boolean; runDir: string }) {
  const latest = (await repository.listRestorePoints(vmName)).at(-1);
  return { latest, chainKey: bitmapChainKeyOf(repository), ...options };
}
