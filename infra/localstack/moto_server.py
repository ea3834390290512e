"""moto server, made cheap per request for runs of thousands of messages and objects.

Run by the local stack as `python -c <this file> -H HOST -p PORT` with the interpreter next
to `moto_server`; the arguments are moto_server's own.

Why: moto's SQS reads the clock through datetime arithmetic for every message it looks at,
and it looks at every message in the queue three times per message it sends (the queue's
attribute counts) and a dozen times per message it receives (it recomputes every queue
attribute to find the retention period). With 5,000 messages queued a receive of ten took
about a second, and the submitter's 5,000-image benchmark spent its time there. The two
replacements below return the same values: the clock as POSIX seconds from `time.time()`,
and the queue's retention period read directly.

Every request also listed moto's package folder (one `isdir` per service, under the lock
that serialises request routing) and formatted a log line nobody reads; the folder is
listed once here, and werkzeug logs only warnings. With the label writes of a harvest
that was about a sixth of moto's busy time (py-spy).
"""

import logging
import sys
import time

from moto import backends, server
from moto.sqs import models

_unix_time = models.unix_time


def unix_time(dt=None):
    return time.time() if dt is None else _unix_time(dt)


def unix_time_millis(dt=None):
    return unix_time(dt) * 1000.0


def is_message_valid_based_on_retention_period(self, queue_name, message):
    queue = self.get_queue(queue_name)
    retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
    return retain_until > unix_time()


models.unix_time = unix_time
models.unix_time_millis = unix_time_millis
models.SQSBackend.is_message_valid_based_on_retention_period = (
    is_message_valid_based_on_retention_period
)

_moto_modules = tuple(backends.list_of_moto_modules())
backends.list_of_moto_modules = lambda: _moto_modules
logging.getLogger("werkzeug").setLevel(logging.WARNING)

if __name__ == "__main__":
    server.main(sys.argv[1:])
