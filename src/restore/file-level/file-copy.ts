import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { execTied } from './host-pieces.ts';

export interface CopySummary {
  files: number;
  directories: number;
  symlinks: number;
  /** Bytes of regular files copied. */
  sizeBytes: number;
}

/**
 * Copies `hostPath` (a file, a symlink as a symlink, or a directory with everything under it) to `target`
 * with owners, modes, times (access and modification), hard links and extended attributes: GNU `cp -a`
 * (`-dR --preserve=all`; never follows a symlink, so nothing outside the guest filesystem is read), in a
 * child tied to us, for the reason `listEntries` gives. `overwrite` copies over what is already at `target`.
 */
export async function copyOut(hostPath: string, target: string, options: { overwrite: boolean; signal?: AbortSignal }): Promise<CopySummary> {
  await execTied('cp', ['--archive', '--no-target-directory', ...(options.overwrite ? [] : ['--no-clobber']), hostPath, target], {
    code: 'FILES_COPY_FAILED',
    signal: options.signal,
  });
  return summarise(target);
}

/** Counts what was copied, reading the local copy (never the mount). */
async function summarise(path: string): Promise<CopySummary> {
  const summary: CopySummary = { files: 0, directories: 0, symlinks: 0, sizeBytes: 0 };
  const visit = async (at: string): Promise<void> => {
    const info = await lstat(at);
    if (info.isSymbolicLink()) summary.symlinks++;
    else if (info.isDirectory()) {
      summary.directories++;
      for (const name of await readdir(at)) await visit(join(at, name));
    } else {
      summary.files++;
      summary.sizeBytes += info.size;
    }
  };
  await visit(path);
  return summary;
}
