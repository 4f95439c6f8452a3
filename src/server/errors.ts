// One renderer for every error: { error: { code, message } } with the code's HTTP status.

import type { FastifyError, FastifyInstance } from 'fastify';
import { HallmarkError, toHallmarkError } from '../errors.js';

export function installErrorHandling(app: FastifyInstance): void {
  app.setErrorHandler((err: FastifyError | HallmarkError, request, reply) => {
    let e: HallmarkError;
    const fe = err as FastifyError;
    if (err instanceof HallmarkError) e = err;
    else if (fe.validation) e = new HallmarkError('BAD_REQUEST', `invalid request: ${fe.message}`);
    else if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') e = new HallmarkError('INPUT_TOO_LARGE', 'request body is too large');
    else if (fe.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') e = new HallmarkError('BAD_REQUEST', 'unsupported content type');
    else if (fe.code === 'FST_ERR_CTP_EMPTY_JSON_BODY' || fe.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || (fe.statusCode === 400 && fe.code?.startsWith('FST_'))) e = new HallmarkError('BAD_REQUEST', fe.message);
    else e = toHallmarkError(err);
    if (e.status >= 500) request.log.error({ err, code: e.code }, 'request failed');
    else request.log.info({ code: e.code, reason: e.message }, 'request refused');
    void reply.status(e.status).type('application/json').send({ error: { code: e.code, message: e.message } });
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({ error: { code: 'NOT_FOUND', message: `no route ${request.method} ${request.url.split('?')[0]}` } });
  });
}
