/**
 * A VM name made safe for a socket file name. The name is fixed per VM (not per session) so that a server
 * a killed task left running is found and reused by the next task instead of blocking it.
 */
export function socketSafe(vmName: string): string {
  return vmName.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 40);
}
