// A free TCP port on loopback for a process we start ourselves (a Mosquitto for the demo or a test).

import { createServer } from 'node:net';

/** A port the OS reports free on 127.0.0.1 — never MQTT's standard 1883 / 8883, which a system broker may own. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => (port === 1883 || port === 8883 ? freePort().then(resolve, reject) : resolve(port)));
    });
  });
}
