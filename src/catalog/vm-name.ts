import { SnapshiftError } from '../core/errors.ts';

/** Letters, digits, `.`, `_`, `-`; 1 to 64 characters; not starting with `.` or `-`. */
const vmNamePattern = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

/**
 * Checks a VM name given from outside (host add, job definitions, backup arguments). Names become parts of
 * file names, socket paths, NBD export names and qemu-storage-daemon options, where a `,` or `/` changes
 * what the option or path means; so only a plain, short name is accepted.
 */
export function checkVmName(name: string): string {
  if (!vmNamePattern.test(name)) {
    throw new SnapshiftError('USAGE', `invalid VM name ${JSON.stringify(name)}: use 1 to 64 letters, digits, ".", "_" or "-", not starting with "." or "-"`);
  }
  return name;
}
