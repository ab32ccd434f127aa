import { exec } from '../core/exec.ts';

export interface MountInfo {
  target: string;
  source: string;
  fstype: string;
}

/** The mount that holds `path` (findmnt follows the path up to its mount point). */
export async function mountOf(path: string): Promise<MountInfo | undefined> {
  try {
    const { stdout } = await exec('findmnt', ['-n', '-J', '-o', 'TARGET,SOURCE,FSTYPE', '-T', path]);
    const parsed = JSON.parse(stdout) as { filesystems: MountInfo[] };
    return parsed.filesystems[0];
  } catch {
    return undefined;
  }
}
