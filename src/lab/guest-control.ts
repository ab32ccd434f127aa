import net from 'node:net';

/**
 * Sends one line to the guest's control serial port (ttyS1), which QEMU serves on a unix socket. The guest
 * reads lines there; "STOP" ends its workload. Plain net.connect: no socat needed on the host.
 */
export async function sendGuestControl(socketPath: string, line: string, timeoutMs = 5000): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => socket.destroy(new Error(`no answer from ${socketPath} within ${timeoutMs} ms`)), timeoutMs);
    socket.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    socket.once('connect', () => {
      socket.end(`${line}\n`, () => {
        clearTimeout(timer);
        resolve();
      });
    });
  });
}
