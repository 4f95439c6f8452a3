// A Mosquitto we start ourselves (the demo, the tests, the benchmark): the machine's binary with a
// configuration from writeMosquittoConfig, on a port of our own — never the system broker's 1883/8883.

import { spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';

export const MOSQUITTO_BINARY = '/usr/sbin/mosquitto';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class MosquittoProcess {
  child: ChildProcess | undefined;
  /** What the broker wrote (stdout and stderr), the last `keepLog` characters. */
  log = '';

  constructor(
    readonly config: string,
    readonly port: number,
    readonly options: { binary?: string; keepLog?: number; maxOpenFiles?: number; host?: string } = {},
  ) {}

  get pid(): number | undefined { return this.child?.pid; }
  get running(): boolean { return !!this.child && this.child.exitCode === null && this.child.signalCode === null; }

  /** Starts it and resolves once its device listener accepts TCP connections. */
  async start(timeoutMs = 10_000): Promise<void> {
    const binary = this.options.binary ?? MOSQUITTO_BINARY;
    const keep = this.options.keepLog ?? 256_000;
    // maxOpenFiles: raise the soft limit of open files (up to the hard limit) for this broker only.
    const child = this.options.maxOpenFiles
      ? spawn('sh', ['-c', `ulimit -n ${Math.trunc(this.options.maxOpenFiles)} 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$0" -c "$1"`, binary, this.config], { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn(binary, ['-c', this.config], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    const append = (d: Buffer): void => {
      this.log += d.toString();
      if (this.log.length > keep * 2) this.log = this.log.slice(-keep);
    };
    child.stdout!.on('data', append);
    child.stderr!.on('data', append);
    let failed: Error | undefined;
    child.once('error', (e) => { failed = e; });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (failed) throw new Error(`cannot start ${binary}: ${failed.message}`);
      if (child.exitCode !== null) throw new Error(`mosquitto exited (${child.exitCode}):\n${this.log}`);
      const ok = await new Promise<boolean>((resolve) => {
        const sock = connect(this.port, this.options.host ?? '127.0.0.1', () => { sock.destroy(); resolve(true); });
        sock.once('error', () => resolve(false));
      });
      if (ok) return;
      if (Date.now() > deadline) throw new Error(`mosquitto did not listen on ${this.port}:\n${this.log}`);
      await sleep(50);
    }
  }

  /** SIGTERM, then SIGKILL after 3 s. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await Promise.race([exited, sleep(3000)]);
    if (child.exitCode === null && child.signalCode === null) { child.kill('SIGKILL'); await exited; }
  }

  /** Resolves when the log matches `re` (after `from` characters), or rejects after `ms`. */
  async waitForLog(re: RegExp, ms = 5000, from = 0): Promise<void> {
    const deadline = Date.now() + ms;
    while (!re.test(this.log.slice(from))) {
      if (Date.now() > deadline) throw new Error(`mosquitto's log did not show ${re} within ${ms} ms:\n${this.log.slice(-3000)}`);
      await sleep(10);
    }
  }
}
