import { existsSync, accessSync, constants } from 'node:fs';

export type Accelerator = 'kvm' | 'tcg';

/**
 * KVM only where it really works: /dev/kvm writable and not provided by the PVM nested module (kvm_pvm),
 * under which a stock Debian kernel crawls and hangs. Everywhere else TCG, which boots the tiny guest in a
 * few seconds.
 */
export function chooseAccelerator(): Accelerator {
  if (existsSync('/sys/module/kvm_pvm')) return 'tcg';
  try {
    accessSync('/dev/kvm', constants.W_OK);
    return 'kvm';
  } catch {
    return 'tcg';
  }
}
