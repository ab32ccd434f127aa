import { existsSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';

/**
 * The next free overlay file for an image, in the image's own folder so a storage snapshot of that volume
 * captures both: `/vms/vm1.qcow2` → `/vms/vm1-00001.qcow2`, then `-00002` if that one exists.
 * `folder` overrides the location for images that are not files (an RBD image's overlay lives locally).
 */
export function nextOverlayPath(imagePath: string, folder?: string, taken: ReadonlySet<string> = new Set()): string {
  const stem = basename(imagePath, extname(imagePath)).replace(/[^A-Za-z0-9._-]/g, '_');
  const dir = folder ?? dirname(imagePath);
  for (let number = 1; number < 100_000; number++) {
    const candidate = join(dir, `${stem}-${String(number).padStart(5, '0')}.qcow2`);
    if (!existsSync(candidate) && !taken.has(candidate)) return candidate;
  }
  throw new Error(`no free overlay file name next to ${imagePath}`);
}

/** True for file names our VM snapshots create; the hunter only ever removes files that match. */
export function isOverlayFileName(path: string): boolean {
  return /-\d{5}\.qcow2$/.test(path);
}
