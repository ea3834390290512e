"""Does moto lose S3 notifications under load? Puts N objects (default 2,000) into a moto
bucket whose notifications go to an SQS queue, 8 at a time, while two consumers receive
and delete; counts the distinct keys whose event arrived, and what is left in the queue.

    .venv/bin/python infra/python/moto_events_check.py 2000

docs/reliability.md gives what it printed (issue 15's unexplained 1,998 of 2,000)."""
import concurrent.futures, json, subprocess, sys, time, socket, threading
import boto3

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

port = free_port()
server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(3)
url = f"http://127.0.0.1:{port}"
kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t")
s3 = boto3.client("s3", **kw); sqs = boto3.client("sqs", **kw)
q = sqs.create_queue(QueueName="events")["QueueUrl"]
arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
s3.create_bucket(Bucket="events-bucket")
s3.put_bucket_notification_configuration(Bucket="events-bucket", NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
seen = set(); stop = False
def consume():
    c = boto3.client("sqs", **kw)
    while not stop:
        for m in c.receive_message(QueueUrl=q, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(m["Body"])
            for r in body.get("Records", []):
                seen.add(r["s3"]["object"]["key"])
            c.delete_message(QueueUrl=q, ReceiptHandle=m["ReceiptHandle"])
threads = [threading.Thread(target=consume) for _ in range(2)]
[t.start() for t in threads]
def put(i):
    boto3.client("s3", **kw).put_object(Bucket="events-bucket", Key=f"incoming/{i:05}.png", Body=b"x" * 100)
with concurrent.futures.ThreadPoolExecutor(8) as ex:
    list(ex.map(put, range(N)))
deadline = time.time() + 240
while len(seen) < N and time.time() < deadline:
    time.sleep(1)
stop = True
[t.join() for t in threads]
attrs = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["All"])["Attributes"]
print(f"{len(seen)} of {N} events arrived; queue: visible {attrs['ApproximateNumberOfMessages']}, in flight {attrs['ApproximateNumberOfMessagesNotVisible']}")
objs = sum(len(p.get("Contents", [])) for p in s3.get_paginator("list_objects_v2").paginate(Bucket="events-bucket"))
print(f"{objs} objects in the bucket")
server.kill()
