// HTTP(S) calls and child processes for tests of a server running in the same process (so nothing
// here may block the event loop).

import { spawn } from 'node:child_process';
import { request as httpsRequest } from 'node:https';
import { request as httpRequest } from 'node:http';

export function runWithInput(cmd: string, args: string[], input: string): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill(), 10000);
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', () => { clearTimeout(timer); resolve({ stdout, stderr }); });
    child.stdin.end(input);
  });
}

export interface Reply { status: number; headers: Record<string, string | string[] | undefined>; body: string }

export function call(url: string, options: { method?: string; token?: string; body?: unknown; rawBody?: string | Buffer; ca?: string; cert?: string; key?: string; headers?: Record<string, string>; maxVersion?: 'TLSv1.2' | 'TLSv1.3' } = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const payload = options.rawBody ?? (options.body === undefined ? undefined : JSON.stringify(options.body));
    const headers: Record<string, string> = {};
    if (options.token) headers.authorization = `Bearer ${options.token}`;
    if (payload !== undefined) headers['content-type'] = 'application/json';
    Object.assign(headers, options.headers);
    const req = (u.protocol === 'https:' ? httpsRequest : httpRequest)(u, { method: options.method ?? 'GET', headers, ca: options.ca, cert: options.cert, key: options.key, maxVersion: options.maxVersion, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

